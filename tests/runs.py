"""Start pretraining and fine-tuning runs, and the tools, the way the tests need them; read what they wrote. The
one place tests start any of these:

    run = start_run(argv, world=2)          # warm ranks forked from the preloaded fork server
    assert run.wait() == 0, run.output()
    output = run_to_end(argv, entry="finetune", world=2)
    code = run_in_this_process(argv, monkeypatch)  # refusals: no rank process, no process group allowed
    code = run_tool("verify_data", [str(data_dir)])
    losses(save_dir), records(save_dir), latest(save_dir)

`start_run` forks each rank from the fork server of tests/distributed.py, which has torch, torch._dynamo
and deepspeed imported already: a run costs its work, not ~4 s of imports. Every rank is a real process
running the entry point's `main(argv)` with the environment a launcher gives it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), so tests can signal or kill it, and it exits with the entry point's exit code. The
launchers themselves (deepspeed, mpirun, torchrun) are tested in test_train_launchers.py with real commands.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import REPO, tiny_train_overrides
from .distributed import _context, _redirect_output, free_port

TINY_CONFIG = str(REPO / "examples/configs/tiny_cpu.yaml")
ZERO0 = str(REPO / "ds_configs/zero0.json")
STEPS, KILL_AFTER, SAVE_EVERY = 10, 6, 3


def pretrain_argv(data, save_dir: Path, variant: str = "narrow", *, ds_config: str = ZERO0, **extra: str) -> list[str]:
    """The entry point's command line for a seconds-long run of tiny_cpu.yaml on tiny_corpus_data: STEPS steps,
    a checkpoint every SAVE_EVERY (override any key, e.g. **{"train.train_steps": "4"})."""
    settings = {"train.save_interval": str(SAVE_EVERY), **extra}
    steps = int(settings.pop("train.train_steps", STEPS))
    return ["--config", TINY_CONFIG, "--deepspeed_config", str(ds_config),
            *tiny_train_overrides(data, save_dir, variant, steps=steps, **settings)]


def allow_fp16_on_this_cpu() -> None:
    """Let DeepSpeed's CPU accelerator accept fp16. It refuses fp16 where oneDNN has no fp16 kernels
    (AVX512-FP16/AMX); torch still computes fp16 on any CPU, only slowly, which is all a tiny test run needs to
    exercise DeepSpeed's fp16 optimizer and its dynamic loss scaler."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True


def _rank_main(entry: str, argv: list[str], env: dict[str, str], log: str,
               before_main: Callable[[], None] | None) -> None:
    """A rank: the caller's environment, output to a file, then the entry point as `python entry.py argv` runs it."""
    os.environ.clear()
    os.environ.update(env)
    os.setsid()  # its own process group, as a launched command has: killpg(pid) reaches it and its workers only
    _redirect_output(Path(log))
    for signum in (signal.SIGTERM, signal.SIGINT):  # as in a fresh interpreter (the fork server may differ)
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)  # a fresh `python` on Linux (<= 3.13): DataLoader
    # workers are the rank's own children, in its process group
    import torch

    torch.set_num_threads(1)
    if before_main is not None:
        before_main()
    from megatron_narrow.entry import exit_now

    sys.argv = [f"{entry}.py", *argv]
    exit_now(entry_point(entry).main(argv))


def entry_point(entry: str):
    """megatron_narrow.pretrain or megatron_narrow.finetune."""
    assert entry in ("pretrain", "finetune"), entry
    return importlib.import_module(f"megatron_narrow.{entry}")


@dataclass
class WarmRun:
    """Handles of a run's rank processes (Popen-like: pid, send_signal, wait) and their output."""

    processes: list = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def pid(self) -> int:
        return self.processes[0].pid

    def send_signal(self, signum: int, *, group: bool = False, ranks: list[int] | None = None) -> None:
        """`signum` to every rank (or to `ranks` only); with group=True to each rank's process group (its
        DataLoader workers too), as a terminal's Ctrl-C or SLURM's --signal delivers it."""
        for rank, process in enumerate(self.processes):
            if ranks is None or rank in ranks:
                (os.killpg if group else os.kill)(process.pid, signum)

    def poll(self) -> int | None:
        codes = [p.exitcode for p in self.processes]
        return None if any(c is None for c in codes) else max(codes, key=abs)

    def wait(self, timeout: float = 300) -> int:
        """The run's exit code (the largest in absolute value over ranks; -N for a signal); kills it on timeout."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in self.processes):
            self.kill()
            raise TimeoutError(f"run timed out after {timeout} s; output:\n{self.output()[-4000:]}")
        return self.poll()

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(10)

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace") if self.logs[rank].exists() else ""


def start_run(argv: list[str], *, world: int = 1, env: dict[str, str] | None = None, entry: str = "pretrain",
              before_main: Callable[[], None] | None = None) -> WarmRun:
    """Start `world` ranks of megatron_narrow/{entry}.py with `argv`, as a launcher would, from warm processes.
    `before_main`, a module-level function, runs in each rank first (allow_fp16_on_this_cpu, say)."""
    workdir = Path(tempfile.mkdtemp(prefix="warm_run_"))
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    if os.path.exists("/sys/class/net/lo"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run = WarmRun(workdir=workdir)
    ctx = _context()
    for rank in range(world):
        rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = workdir / f"rank{rank}.log"
        process = ctx.Process(target=_rank_main, args=(entry, argv, rank_env, str(log), before_main),
                              name=f"rank{rank}")
        process.start()
        run.processes.append(process)
        run.logs.append(log)
    return run


def run_to_end(argv: list[str], *, world: int = 1, env: dict[str, str] | None = None, expect: int = 0,
               entry: str = "pretrain", timeout: float = 300, before_main: Callable[[], None] | None = None) -> str:
    """Run to the end; assert the exit code and return rank 0's output."""
    run = start_run(argv, world=world, env=env, entry=entry, before_main=before_main)
    code = run.wait(timeout)
    output = run.output()
    assert code == expect, f"exit code {code}, expected {expect}; rank 0 output:\n{output[-4000:]}" + (
        f"\nrank 1:\n{run.output(1)[-3000:]}" if world > 1 else "")
    shutil.rmtree(run.workdir, ignore_errors=True)
    return output


def run_in_this_process(argv: list[str], monkeypatch, *, entry: str = "pretrain", world: int = 1) -> int:
    """The entry point's exit code for `argv`, called in this process as rank 0 of `world`, for runs that must be
    refused before they start: any process-group work fails the test (a refusal comes first)."""
    import torch.distributed

    from megatron_narrow.training import loop

    def no_process_group(*args, **kwargs):
        raise AssertionError("process-group work began before the run was refused")

    monkeypatch.setattr(loop, "init_distributed", no_process_group)
    monkeypatch.setattr(torch.distributed, "init_process_group", no_process_group)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for variable in ("RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return entry_point(entry).main(argv)


def run_tool(name: str, argv: list[str], **hooks) -> int:
    """tools/NAME.py's exit code for `argv`, run in this process (its main(argv) is the command line; `hooks` are
    main's keyword arguments for tests, e.g. evaluate_suite's `launch`). A test that kills a tool starts it as a
    process of its own; the documents' commands run in tests/doc_commands.py."""
    module = sys.modules.get(f"tool_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
    return module.main(argv, **hooks)


class WarmJob:
    """A job of tasks/jobs.py's JobPool (`python ENTRY.py ARGS`) as a warm rank of the fork server: a suite's
    run costs its work, not ~8 s of imports. Its output is appended to the pool's log file when it ends."""

    def __init__(self, command: list[str], log_file: Path, env: dict[str, str]) -> None:
        self.log_file = log_file
        self.run = start_run(command[1:], entry=Path(command[0]).stem, env={"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]})

    def poll(self) -> int | None:
        return self.run.poll()

    def send_signal(self, signum: int) -> None:
        self.run.send_signal(signum)

    def wait(self) -> int:
        code = self.run.wait(600)
        with open(self.log_file, "a") as log:
            log.write(self.run.output())
        shutil.rmtree(self.run.workdir, ignore_errors=True)
        return code


def start_run_until(argv: list[str], ready: Callable[[], bool], *, world: int = 1, timeout: float = 300,
                    entry: str = "pretrain") -> WarmRun:
    """Start a run and return it, still running, once `ready()` holds (to signal or kill it at that moment)."""
    run = start_run(argv, world=world, entry=entry)
    deadline = time.monotonic() + timeout
    while not ready() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.poll() is None, f"the run ended before the moment it was started for:\n{run.output()[-2000:]}"
    return run


def kill_once_checkpointed(argv: list[str], save_dir: Path, step: int, *, world: int = 1) -> int:
    """Start a run and SIGKILL every rank (and its DataLoader workers) once checkpoint `step` is the latest;
    returns the step of the latest checkpoint left behind (`step`, or a later one on a machine slow to kill)."""
    run = start_run_until(argv, lambda: latest(save_dir) == f"step_{step:07d}", world=world)
    run.send_signal(signal.SIGKILL, group=True)
    run.wait()
    return int(latest(save_dir).removeprefix("step_"))


def records(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(save_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(save_dir) if "loss" in r}


def latest(save_dir: Path) -> str | None:
    marker = Path(save_dir) / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def latest_weights(save_dir: Path) -> dict[str, object]:
    """Every model tensor of the latest checkpoint, keyed "file:name" (each TP rank and pipeline layer file)."""
    import torch

    tag = Path(save_dir) / "checkpoints" / latest(save_dir)
    out = {}
    for file in sorted(tag.glob("*model_states.pt")):
        state = torch.load(file, map_location="cpu", weights_only=False)
        module = state["module"] if "module" in state else state  # pipeline: None there, tensors in layer_* files
        for name, value in (module or {}).items():
            out[f"{file.name}:{name}"] = value
    assert out, f"no model states in {tag}"
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    """The latest checkpoints of two runs hold the same model tensors, bit for bit."""
    import torch

    first, second = latest_weights(a), latest_weights(b)
    assert sorted(first) == sorted(second)
    changed = [name for name in first if not torch.equal(first[name], second[name])]
    assert not changed, f"the final weights differ: {changed[:5]}"


def copy_run_dir(reference: Path, target: Path) -> Path:
    """A private copy of a shared run's save_dir, for a test that resumes or damages it."""
    shutil.copytree(reference, target)
    return target


def resume_from(reference: Path, target: Path, step: int) -> Path:
    """A copy of `reference` as it was when checkpoint `step` had just been saved: newer tags removed, `latest`
    on that tag, metrics after it dropped (the resumed run writes them again)."""
    from megatron_narrow.formats import checkpoint_files

    copy_run_dir(reference, target)
    root = checkpoint_files.checkpoint_root(target)
    for tag in checkpoint_files.all_tags(target):
        if checkpoint_files.step_of(tag) > step:
            shutil.rmtree(root / tag)
    assert (root / checkpoint_files.tag_of(step)).is_dir(), f"{reference} has no checkpoint of step {step}"
    (root / "latest").write_text(checkpoint_files.tag_of(step) + "\n")
    kept = [r for r in records(target) if r["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return target
