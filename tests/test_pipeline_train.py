"""Pipeline parallelism end to end, through the real entry point: for every variant, PP=2 (two gloo ranks)
and TP=2 x PP=2 (four) train 10 steps with per-step losses equal to one process; PP=2 resumes bit for bit
after SIGKILL; a TP=2 x PP=2 checkpoint converts to Hugging Face with the single-process model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import REPO, tiny_train_overrides
from .distributed import run_distributed

STEPS, SAVE_EVERY = 10, 3
TOL = 1e-5
# one layout per run: name -> (pipeline_parallel, tensor_parallel)
LAYOUTS = {"single": (1, 1), "pp2": (2, 1), "tp2_pp2": (2, 2)}


def _train(rank: int, world_size: int, argv: list[str]) -> int:
    from megatron_narrow.pretrain import main

    code = main(argv)
    if code:
        raise RuntimeError(f"pretrain exited with {code}")
    return code


def argv(data, save_dir: Path, variant: str, pipeline: int, tensor: int, **extra: str) -> list[str]:
    """10 steps of 2 micro-batches (the pipeline schedule interleaves them), dropout off, ZeRO-1."""
    overrides = tiny_train_overrides(data, save_dir, variant, steps=STEPS, **{
        "model.hidden_dropout": "0.0", "model.attention_dropout": "0.0", "train.global_batch_size": "16",
        "train.save_interval": str(SAVE_EVERY), "parallel.pipeline_parallel": str(pipeline),
        "parallel.tensor_parallel": str(tensor), **extra})
    return ["--config", str(REPO / "examples/configs/tiny_cpu.yaml"),
            "--deepspeed_config", str(REPO / "ds_configs/zero1.json"), *overrides]


def losses(save_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module", params=["bert", "narrow", "token_drop"])
def runs(request, tmp_path_factory, tiny_corpus_data) -> dict[str, Path]:
    """layout name -> save_dir of a finished 10-step run of the variant."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"pipeline_{variant}")
    out = {"variant": variant}
    for name, (pipeline, tensor) in LAYOUTS.items():
        save_dir = root / name
        run_distributed(_train, pipeline * tensor, argv(tiny_corpus_data, save_dir, variant, pipeline, tensor),
                        init_process_group=False, timeout=400, env={"DS_ACCELERATOR": "cpu"})
        out[name] = save_dir
    return out


def test_pipeline_losses_equal_one_process(runs):
    reference = losses(runs["single"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1], "the tiny run must learn"
    for name in ("pp2", "tp2_pp2"):
        got = losses(runs[name])
        assert sorted(got) == sorted(reference), name
        for step in reference:
            assert abs(got[step] - reference[step]) <= TOL, \
                f"{runs['variant']} {name} step {step}: {got[step]!r}, one process {reference[step]!r}"
        worst = max(abs(got[s] - reference[s]) for s in reference)
        print(f"{runs['variant']} {name}: largest per-step loss difference {worst:.2e}")
