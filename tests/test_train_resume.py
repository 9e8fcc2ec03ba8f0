"""Exact resume: SIGKILL a real training process after a checkpoint, resume, and get the same losses bit for
bit; a checkpoint cut off mid-write never becomes the one that loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, tiny_train_overrides
from .distributed import free_port

STEPS, KILL_AFTER, SAVE_EVERY = 10, 6, 3


def command(data, save_dir: Path, variant: str) -> list[str]:
    overrides = tiny_train_overrides(data, save_dir, variant, steps=STEPS, **{"train.save_interval": str(SAVE_EVERY)})
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


def losses(save_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def latest(save_dir: Path) -> str | None:
    marker = save_dir / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
def test_sigkill_then_resume_gives_identical_losses(tmp_path, tiny_corpus_data, variant):
    reference = tmp_path / "reference"
    subprocess.run(command(tiny_corpus_data, reference, variant), check=True, env=environment(),
                   capture_output=True)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1], "the tiny run must learn"

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(tiny_corpus_data, killed, variant), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while latest(killed) != f"step_{KILL_AFTER:07d}" and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(losses(killed))
    assert KILL_AFTER <= killed_at < STEPS, (killed_at, latest(killed))

    result = subprocess.run(command(tiny_corpus_data, killed, variant), env=environment(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {KILL_AFTER}" in result.stdout
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    for step in range(KILL_AFTER + 1, STEPS + 1):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]!r} != {expected[step]!r}"


def test_checkpoint_cut_off_mid_write_is_never_loaded(tmp_path, tiny_corpus_data):
    """A save killed before it completes leaves `latest` on the previous checkpoint (it is replaced only after
    every rank has written): a half-written newer directory is ignored and the previous one resumes."""
    save_dir = tmp_path / "run"
    subprocess.run(command(tiny_corpus_data, save_dir, "narrow"), check=True, env=environment(), capture_output=True)
    root = save_dir / "checkpoints"
    assert latest(save_dir) == f"step_{STEPS:07d}"
    (root / "latest").write_text(f"step_{STEPS - 1 - (STEPS - 1) % SAVE_EVERY:07d}\n")  # as before the last save
    final = root / f"step_{STEPS:07d}"
    for file in final.glob("*.pt"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])  # the kill cut the write short
    expected = losses(save_dir)
    result = subprocess.run(command(tiny_corpus_data, save_dir, "narrow"), env=environment(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {STEPS - 1 - (STEPS - 1) % SAVE_EVERY}" in result.stdout
    assert losses(save_dir) == expected


def test_pruning_keeps_the_published_checkpoint_and_drops_leftovers_of_a_killed_save(tmp_path):
    from megatron_narrow.training import checkpoint

    class Engine:  # stands in for DeepSpeed: writes a tag directory
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)

    root = checkpoint.checkpoint_root(tmp_path)
    (root / "step_0000200").mkdir(parents=True)  # a save of step 200 was killed half-way
    for step in (100, 150):
        checkpoint.save(Engine(), tmp_path, step, {}, run_config={}, tokenizer_model=None, keep_last=1,
                        is_rank0=True)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_0000150"]
    assert checkpoint.latest_tag(tmp_path) == "step_0000150"


def test_resume_drops_a_metrics_line_torn_by_the_kill(tmp_path):
    from megatron_narrow.training.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                                            '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=2, total_steps=10)
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
