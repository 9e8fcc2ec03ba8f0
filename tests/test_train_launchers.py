"""Two CPU ranks under each launcher (deepspeed, mpirun through mpi4py, torchrun) train every variant with
falling loss; data parallel 2 reproduces one process with the same global batch."""

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
    elif launcher == "mpirun":
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp",
                   OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
        command = ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
                   "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", sys.executable, SCRIPT]
    else:
        command = [sys.executable, SCRIPT]
    result = subprocess.run([*command, *CONFIG, *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{launcher} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def losses(save_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun", "torchrun"])
def test_two_ranks_train_with_falling_loss(tmp_path, tiny_corpus_data, launcher, variant):
    save_dir = tmp_path / "run"
    launch(launcher, 2, tiny_train_overrides(tiny_corpus_data, save_dir, variant, steps=20))
    values = losses(save_dir)
    assert len(values) == 20
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < first - 0.3, f"{launcher}/{variant}: loss {first:.3f} -> {last:.3f}"
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in records) and records[1]["lr"] > records[-1]["lr"] > 0
    assert records[-1]["consumed_samples"] == 20 * 16  # micro 8 x 2 data-parallel ranks


@pytest.mark.parametrize("variant", ["narrow", "token_drop"])
def test_data_parallel_two_equals_one_process(tmp_path, tiny_corpus_data, variant):
    no_dropout = {"model.hidden_dropout": "0.0", "model.attention_dropout": "0.0"}
    single = tmp_path / "single"
    launch("python", 1, tiny_train_overrides(tiny_corpus_data, single, variant, steps=6,
                                             **{**no_dropout, "train.micro_batch_size": "16"}))
    parallel = tmp_path / "dp2"
    launch("torchrun", 2, tiny_train_overrides(tiny_corpus_data, parallel, variant, steps=6, **no_dropout))
    a, b = losses(single), losses(parallel)
    assert len(a) == len(b) == 6
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert abs(x - y) <= 1e-5, f"step {step}: one process {x!r}, data parallel {y!r}"
