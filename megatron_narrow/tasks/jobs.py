"""Run entry points as one-rank processes, several at a time: the fine-tuning suite's runs (and the quality
study's stages). Each process gets the environment a launcher gives rank 0 of a world of one, its own
MASTER_PORT and an equal share of the cores; a stop forwards SIGTERM to the running ones (they checkpoint and exit
75) and starts no more."""

from __future__ import annotations

import heapq
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "megatron_narrow" / "finetune.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_env(threads: int | None) -> dict[str, str]:
    """The environment of rank 0 of a world of one (gloo on a free port), `threads` intra-op threads."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


class Process(Protocol):
    def wait(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...


Launch = Callable[[list[str], Path, dict[str, str]], Process]
"""(command, log file to append to, environment) -> the started process."""


class JobPool:
    """Runs commands (`python SCRIPT ARGS`) `jobs` at a time, each with cores // jobs
    threads; a free slot goes to the waiting command of lowest priority number, first come first served among
    equals. Thread-safe: call `run` from one thread per command."""

    def __init__(self, jobs: int, cwd: Path | None = None, env: dict[str, str] | None = None,
                 launch: Launch | None = None) -> None:
        """`cwd`: where the commands run (default: this process's working directory); `env`: added to theirs;
        `launch`: how a command starts (default: `python COMMAND` as a subprocess; tests start warm processes)."""
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        self.jobs, self.cwd, self.env = jobs, cwd, env or {}
        self.launch = launch or self._subprocess
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self._free = jobs
        self._waiting: list[tuple[int, int]] = []
        self._tickets = itertools.count()
        self._changed = threading.Condition()
        self._running: set[Process] = set()
        self.stopping = False

    def run(self, command: list[str], log_file: Path, priority: int = 1) -> int | None:
        """The command's exit code once it ends (its output in log_file); None if the pool stopped first."""
        with self._changed:
            ticket = (priority, next(self._tickets))
            heapq.heappush(self._waiting, ticket)
            self._changed.wait_for(lambda: self.stopping or (self._free > 0 and self._waiting[0] == ticket))
            self._waiting.remove(ticket)
            heapq.heapify(self._waiting)
            if self.stopping:
                self._changed.notify_all()
                return None
            self._free -= 1
            self._changed.notify_all()
            log_file.parent.mkdir(parents=True, exist_ok=True)
            process = self.launch(command, log_file, {**one_rank_env(self.threads), **self.env})
            self._running.add(process)
        try:
            return process.wait()
        finally:
            with self._changed:
                self._running.discard(process)
                self._free += 1
                self._changed.notify_all()

    def _subprocess(self, command: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log_file, "a") as out:
            return subprocess.Popen([sys.executable, *command], cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                    env=env)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Start nothing more; `signum` to every running command (fine-tuning checkpoints and exits 75)."""
        with self._changed:
            self.stopping = True
            for process in self._running:
                if process.poll() is None:
                    process.send_signal(signum)
            self._changed.notify_all()
