"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's slurm-wlm, on this machine.

    with LocalSlurm(tmp_path) as slurm:
        subprocess.run(["sbatch", "--parsable", "script.sbatch"], env={**os.environ, **slurm.env}, ...)
        slurm.wait_for(job_id, lambda info: info["JobState"] == "COMPLETED", timeout=120)

Everything lives under the given directory (its own slurm.conf, state, spool, logs, free ports); the
daemons run as root and are stopped, with every job, when the context exits. The system's munged is used
if one runs; otherwise one is started (and stopped) with the package's key, created if missing.
slurmctld checks time limits (and sends `--signal` warnings) only every 30 s: a test that needs a signal at a
known moment sends it with `scancel --signal`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")


def slurm_installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self.pids: list[int] = []
        self.started_at = 0.0

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        for name in ("state", "spool"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        r = self.root
        (r / "slurm.conf").write_text(f"""ClusterName=megatron_narrow_test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=3600
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName={self.host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving the default socket
        if not MUNGE_KEY.is_file():
            subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        pid_file = Path("/run/munge/munged.pid")
        if pid_file.is_file():
            self.pids.append(int(pid_file.read_text()))

    def start(self) -> None:
        self._write_config()
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon], env=self.env, check=True)  # they daemonize and write their pid files
        self.started_at = time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):  # both daemons are up and have written their pid files
                self.pids += [int((self.root / f"{d}.pid").read_text()) for d in ("slurmctld", "slurmd")]
                return
            time.sleep(0.2)
        raise RuntimeError(f"the local SLURM node did not come up (state {state!r}); see {self.root}/slurmd.log")

    def stop(self) -> None:
        """Cancel every job, then end the daemons and everything in their sessions (slurmd forks a child per
        request, and such a child can outlive its parent)."""
        self.run(["scancel", "--full", "--user", "root"], check=False)
        sessions = {os.getsid(pid) for pid in self.pids if _alive(pid)} - {os.getsid(0)}  # never our own
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in self.pids):
            time.sleep(0.1)
        for pid in set(_session_members(sessions)) | set(_working_in(self.root)):
            os.kill(pid, signal.SIGKILL)

    def run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        result = self.run(["scontrol", "show", "job", "-o", job_id], check=False)  # may fail while it is requeued
        return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)

    def wait_for(self, job_id: str, condition: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info and condition(info):
                return info
            if time.monotonic() > deadline:
                log = (self.root / "slurmctld.log").read_text(errors="replace")[-3000:]
                raise TimeoutError(f"job {job_id}: {info.get('JobState')} {info.get('Reason')} after {timeout} s; "
                                   f"slurmctld.log:\n{log}")
            time.sleep(0.2)


def _session_members(sessions: set[int]) -> list[int]:
    """Live processes whose session is one of `sessions`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) in sessions and _alive(int(entry.name)):
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _working_in(root: Path) -> list[int]:
    """Live processes whose working directory is under `root` (the daemons chdir there, and so do their
    children)."""
    root = root.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cwd = (entry / "cwd").resolve()
            except OSError:
                continue
            if (cwd == root or root in cwd.parents) and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
