"""The launchers: deepspeed, mpirun (ranks through mpi4py) and torchrun each start two data-parallel CPU ranks
that reproduce one process with the same global batch (one variant per launcher; the warm runs of
tests/runs.py cover the variants under every other layout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, tiny_train_overrides
from .distributed import free_port
from .runs import run_pretraining

SCRIPT = str(REPO / "megatron_narrow/pretrain.py")
CONFIG = ["--config", str(REPO / "examples/configs/tiny_cpu.yaml"),
          "--deepspeed_config", str(REPO / "ds_configs/zero0.json")]


def launch(launcher: str, ranks: int, overrides: list[str]) -> subprocess.CompletedProcess:
    port = str(free_port())
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    if launcher == "deepspeed":
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", port, SCRIPT]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", port, SCRIPT]
    else:
        assert launcher == "mpirun", launcher
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp",
                   OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
        command = ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
                   "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", sys.executable, SCRIPT]
    result = subprocess.run([*command, *CONFIG, *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{launcher} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def losses(save_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


NO_DROPOUT = {"model.hidden_dropout": "0.0", "model.attention_dropout": "0.0"}
STEPS = 6


@pytest.mark.parametrize(("launcher", "variant"), [("deepspeed", "bert"), ("mpirun", "narrow"),
                                                   ("torchrun", "token_drop")])
def test_two_ranks_under_each_launcher_equal_one_process(tmp_path, tiny_corpus_data, launcher, variant):
    """Each launcher starts two data-parallel ranks that find their rank (through the launcher's environment,
    or mpi4py under mpirun) and read different halves of every global batch: their per-step losses equal one
    process with the same global batch at 1e-5. Two ranks reading the same data, or one rank training
    alone, would give other losses."""
    single = tmp_path / "single"
    run_pretraining([*CONFIG, *tiny_train_overrides(
        tiny_corpus_data, single, variant, steps=STEPS, **{**NO_DROPOUT, "train.micro_batch_size": "16"})])
    parallel = tmp_path / "dp2"
    result = launch(launcher, 2, tiny_train_overrides(tiny_corpus_data, parallel, variant, steps=STEPS, **NO_DROPOUT))
    a, b = losses(single), losses(parallel)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert abs(x - y) <= 1e-5, f"{launcher}/{variant} step {step}: one process {x!r}, two ranks {y!r}"
    assert a[-1] < a[0], "the tiny run must learn"
    records = [json.loads(line) for line in (parallel / "metrics.jsonl").read_text().splitlines()]
    assert [r["consumed_samples"] for r in records] == [16 * step for step in range(1, STEPS + 1)]
    assert "Traceback" not in result.stderr
