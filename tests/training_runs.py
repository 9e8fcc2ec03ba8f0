"""Helpers for tests that run real training processes on tiny_corpus_data (examples/configs/tiny_cpu.yaml)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, tiny_train_overrides
from .distributed import free_port

STEPS, KILL_AFTER, SAVE_EVERY = 10, 6, 3


def command(data, save_dir: Path, variant: str, **extra: str) -> list[str]:
    settings = {"train.save_interval": str(SAVE_EVERY), **extra}
    overrides = tiny_train_overrides(data, save_dir, variant, steps=int(settings.pop("train.train_steps", STEPS)),
                                     **settings)
    return [sys.executable, str(REPO / "megatron_narrow/pretrain.py"),
            "--config", str(REPO / "examples/configs/tiny_cpu.yaml"),
            "--deepspeed_config", str(REPO / "ds_configs/zero0.json"), *overrides]


def environment() -> dict[str, str]:
    """One process of its own: a free rendezvous port, so concurrent runs never meet on the default 29500."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def records(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def losses(save_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(save_dir) if "loss" in r}


def latest(save_dir: Path) -> str | None:
    marker = save_dir / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def copy_run_dir(reference: Path, target: Path) -> Path:
    """A private copy of a shared run's save_dir, for a test that resumes or damages it."""
    shutil.copytree(reference, target)
    return target
