"""Run a function on N local CPU processes joined by a gloo process group, for multi-rank tests.

    results = run_distributed(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on ranks 0 and 1

`fn` must be a module-level function of an importable module (it is pickled by reference). Each rank
returns a picklable value (tensors are detached and moved to the CPU for you); the list of values comes
back in rank order. If any rank raises, exits abnormally or runs past `timeout`, every rank is killed
and `DistributedTestError` carries the failing rank's traceback (the earliest exception first). What the
ranks print is replayed on this process's stdout, prefixed "[rank N]", so pytest shows it on failure.

Children start from a fork server that has torch preloaded, so a launch costs a fraction of a second
rather than one torch import per rank. Each child still imports fn's module: keep heavy imports
(transformers, deepspeed) inside the functions that need them, not at the top of that module.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Imported once by the fork server. torch.distributed.tensor pulls in sympy (0.5-1 s), which the first
# torch.testing.assert_close call in a child would otherwise import again in every rank.
_PRELOAD = ["__main__", "torch", "torch.distributed", "torch.distributed.tensor", "torch.nn.functional",
            "torch._dynamo", "deepspeed", "megatron_narrow.training.loop", "tests.rank_preload"]
_GRACE_S = 2.0  # how long the other ranks may take to finish once one rank has failed
_SLOW_S = 30.0  # a rank still running after this long dumps its stacks into its log, and a run that took
# longer warns with them (an intermittent stall of ~120 s in 4-rank gloo tests has been seen twice)
_NO_OUTPUT_HINT = ("(none: did unpickling fn fail before it ran? Is its module importable, and is the main module "
                   "guarded by if __name__ == '__main__'?)")


class DistributedTestError(RuntimeError):
    """A rank raised, crashed or timed out; the message holds what each rank reported."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and ask the kernel).

    For launchers that need a MASTER_PORT (torchrun, deepspeed, mpirun tests). run_distributed itself
    needs none: its store listens on a port the kernel picks and holds it, so no other run can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # ignored if the fork server is already running
        return ctx
    return mp.get_context("spawn")


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_cpu(v) for v in value)
    return value


def _write(path: Path, payload: tuple[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, path)


def _redirect_output(log: Path) -> None:
    """Send this rank's stdout and stderr (C++ included) to a file that the caller replays after the run.

    A fork-server child would otherwise write to whatever the server inherited when it started (under
    pytest, the capture file of the first test that launched ranks)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, result_dir: str,
            args: tuple, env: dict[str, str], timeout: float, init: bool) -> None:
    os.environ.clear()  # a fork-server child inherits the server's environment: use the caller's, as of the launch
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                       "OMP_NUM_THREADS": "1"})
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never depend on how the hostname resolves
    path = Path(result_dir) / f"rank{rank}.pkl"
    _redirect_output(Path(result_dir) / f"rank{rank}.log")
    faulthandler.dump_traceback_later(_SLOW_S, exit=False)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        value = _to_cpu(fn(rank, world_size, *args))
        try:
            _write(path, ("ok", value))
        except Exception:  # unpicklable return value
            raise TypeError(f"rank {rank} returned a value that cannot be pickled: {type(value)!r}") from None
    except BaseException:
        _write(path, ("error", (time.time(), traceback.format_exc())))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: the other ranks may be stuck in a collective with us
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # interpreter teardown after torch.distributed is slow and has been seen to abort (signal 6)


def _tail(path: Path, limit: int = 20000) -> str:
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    return text if len(text) <= limit else "..." + text[-limit:]


def _read(path: Path) -> tuple[str, Any] | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _kill(procs: list[mp.process.BaseProcess]) -> None:
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.kill()
    for p in started:
        p.join(5)


def _launch(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float, env: dict[str, str],
            init: bool) -> list[Any]:
    import torch.distributed as dist

    ctx = _context()
    result_dir = tempfile.mkdtemp(prefix="run_distributed_")
    paths = [Path(result_dir) / f"rank{r}.pkl" for r in range(world_size)]
    # The rendezvous store lives here, on a port the kernel picks (0) and that stays bound for the whole run:
    # no race for a "free" port with concurrent runs, and it is listening before any rank tries to connect.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout)) if init else None
    port = store.port if store is not None else free_port()  # without init, rank 0 will bind MASTER_PORT itself
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, result_dir, args, env, timeout, init),
                         name=f"rank{r}") for r in range(world_size)]  # not daemonic: ranks may start workers
    started = time.monotonic()
    try:
        for p in procs:
            p.start()
        deadline = started + timeout
        failed_at: float | None = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if now >= deadline or (failed_at is not None and now >= failed_at + _GRACE_S):
                break
            until = deadline if failed_at is None else min(deadline, failed_at + _GRACE_S)
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=until - now)
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
        timed_out = [r for r, p in enumerate(procs) if p.is_alive()]
        _kill(procs)

        logs = [_tail(Path(result_dir) / f"rank{r}.log") for r in range(world_size)]
        for rank, log in enumerate(logs):  # replay the ranks' output where the caller (or pytest) captures it
            if log:
                sys.stdout.write("".join(f"[rank {rank}] {line}\n" for line in log.splitlines()))
        results, problems = [], []
        for rank, (p, path) in enumerate(zip(procs, paths, strict=True)):
            got = _read(path)
            if got is not None and got[0] == "error":
                when, text = got[1]
                problems.append(((0, when), f"rank {rank} raised:\n{text}"))
            elif rank in timed_out:
                why = f"timed out after {timeout} s" if failed_at is None else "was killed after another rank failed"
                output = f"; its last output:\n{logs[rank][-4000:]}" if logs[rank] else ""
                problems.append(((2, 0.0), f"rank {rank} {why}{output}"))
            elif p.exitcode != 0 or got is None:
                after = "after returning" if got is not None else "without a result"
                output = logs[rank][-4000:] or _NO_OUTPUT_HINT
                problems.append(((1, 0.0), f"rank {rank} exited with code {p.exitcode} {after}; its output:\n{output}"))
            else:
                results.append(got[1])
        if not problems and time.monotonic() - started > _SLOW_S:
            stacks = "\n".join(f"rank {rank}:\n{log[-3000:]}" for rank, log in enumerate(logs) if "Thread 0x" in log)
            warnings.warn(f"{fn.__module__}.{fn.__qualname__} on {world_size} ranks took "
                          f"{time.monotonic() - started:.0f} s; stacks after {_SLOW_S:.0f} s:\n{stacks}", stacklevel=3)
        if problems:
            problems.sort(key=lambda item: item[0])  # root cause first: the earliest exception, then crashes
            raise DistributedTestError(f"{fn.__module__}.{fn.__qualname__} on {world_size} ranks failed:\n"
                                       + "\n".join(text for _, text in problems))
        return results
    finally:
        _kill(procs)
        del store
        shutil.rmtree(result_dir, ignore_errors=True)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120,
                    env: dict[str, str] | None = None, init_process_group: bool = True) -> list[Any]:
    """Call fn(rank, world_size, *args) on `world_size` gloo CPU processes; return their values in rank order.

    Args:
        fn: a module-level function; torch.distributed is initialised (gloo, 127.0.0.1, a free port) when
            it runs, with torch.set_num_threads(1), and the process group is destroyed after it returns.
        world_size: number of processes.
        args: extra picklable arguments passed to every rank.
        timeout: seconds for the whole run; past it every rank is killed and DistributedTestError raised.
        env: extra environment variables for every child; children otherwise see this process's os.environ as
            of the call, plus MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE and OMP_NUM_THREADS=1.
        init_process_group: False leaves the initialisation to fn (code under test that initialises
            torch.distributed from those environment variables, as torchrun's children do); the harness
            still destroys the process group if fn leaves one.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return _launch(fn, world_size, args, timeout, {**os.environ, **(env or {})}, init_process_group)
