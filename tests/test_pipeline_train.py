"""Pipeline parallelism end to end, through the real entry point: for every variant, PP=2 (two gloo ranks)
and TP=2 x PP=2 (four) train 10 steps with per-step losses equal to one process; PP=2 resumes bit for bit
after SIGKILL; a TP=2 x PP=2 checkpoint converts to Hugging Face with the single-process model's logits."""

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
from .distributed import free_port, run_distributed

STEPS, SAVE_EVERY, KILL_AFTER = 10, 3, 6
TOL = 1e-5
# one layout per run: name -> (pipeline_parallel, tensor_parallel)
LAYOUTS = {"single": (1, 1), "pp2": (2, 1), "tp2_pp2": (2, 2)}


def _train(rank: int, world_size: int, argv: list[str]) -> int:
    """What the entry point runs; returns the first step this run trained (after a resume: the next one)."""
    import torch.distributed as dist

    from megatron_narrow.config import load_run_config
    from megatron_narrow.pretrain import parse_args
    from megatron_narrow.training.loop import pretrain

    args = parse_args(argv)
    records = pretrain(load_run_config(args.config, args.overrides), args.deepspeed_config)
    dist.destroy_process_group()
    return records[0]["step"]


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


def latest(save_dir: Path) -> str | None:
    marker = save_dir / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def test_pipeline_resume_after_sigkill_is_bit_exact(runs, tiny_corpus_data):
    """SIGKILL both ranks of a PP=2 run once step 6 is checkpointed; the resumed run's losses equal the
    uninterrupted PP=2 run's bit for bit. The ranks are started directly (RANK/WORLD_SIZE, as a launcher
    would) because SIGKILL to torchrun's agent leaves its workers running."""
    save_dir = runs["pp2"].parent / "pp2_killed"
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        command = [sys.executable, str(REPO / "megatron_narrow/pretrain.py"),
                   *argv(tiny_corpus_data, save_dir, runs["variant"], 2, 1)]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 300
    while (latest(save_dir) != f"step_{KILL_AFTER:07d}" and all(r.poll() is None for r in ranks)
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert all(r.poll() is None for r in ranks), "training ended before it could be killed"
    for process in ranks:
        process.send_signal(signal.SIGKILL)
    for process in ranks:
        process.wait()
    resume_from = int(latest(save_dir).removeprefix("step_"))  # 6, or 9 on a machine slow to deliver the kill
    assert resume_from in (KILL_AFTER, KILL_AFTER + SAVE_EVERY) and max(losses(save_dir)) < STEPS

    first = run_distributed(_train, 2, argv(tiny_corpus_data, save_dir, runs["variant"], 2, 1),
                            init_process_group=False, timeout=400, env={"DS_ACCELERATOR": "cpu"})
    assert first == [resume_from + 1] * 2, f"both ranks must resume after step {resume_from}, not {first}"
    expected, resumed = losses(runs["pp2"]), losses(save_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    for step in range(resume_from + 1, STEPS + 1):
        assert resumed[step] == expected[step], \
            f"{runs['variant']} step {step}: {resumed[step]!r} != {expected[step]!r}"


def test_tp2_pp2_checkpoint_converts_with_the_single_process_logits(runs, tmp_path):
    """The TP=2 x PP=2 run's checkpoint -> Hugging Face; stock transformers' MLM logits equal those of our
    one-process model holding the one-process run's weights (the same training, another layout)."""
    import torch

    from megatron_narrow.config import ModelConfig
    from megatron_narrow.convert.checkpoint import convert_checkpoint, read_checkpoint_info
    from megatron_narrow.model import BertForPreTraining

    from .test_convert_checkpoint import VOCAB, hf_batch, hf_logits, step_dir

    variant = runs["variant"]
    info = read_checkpoint_info(runs["tp2_pp2"])
    assert (info.tensor_parallel, info.pipeline_parallel, info.step) == (2, 2, STEPS)
    hf_dir = convert_checkpoint(runs["tp2_pp2"], tmp_path / "hf")
    assert "pipeline_parallel=2" in (hf_dir / "README.md").read_text()
    batch = hf_batch(hf_dir)
    got = hf_logits(hf_dir, batch, trust_remote_code=variant == "narrow")

    run = json.loads((step_dir(runs["single"]) / "run_config.json").read_text())
    model_config = {**run["model"], "variant": "bert" if variant == "token_drop" else variant}  # dropping trains only
    model = BertForPreTraining(ModelConfig(**model_config)).eval()
    module = torch.load(step_dir(runs["single"]) / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    module.pop("bert.token_importance.importance", None)
    model.load_state_dict(module, strict=True)
    with torch.no_grad():
        expected = model(**batch, target_valid=torch.ones_like(batch["target_ids"], dtype=torch.bool)).logits
    worst = (got - expected[..., :VOCAB]).abs().max().item()
    print(f"{variant}: TP2xPP2 export vs one-process model, largest logit difference {worst:.2e}")
    assert worst <= TOL


def test_pipeline_with_pair_head_and_evaluation_equals_one_process(tmp_path, tiny_corpus_data):
    """Sentence-order prediction (the pooled [CLS] is the first query, the pair classifier sits on the last
    stage) and evaluation through the pipeline engine's inference schedule: the same losses as one process."""
    extra = {"data.pair_task": "sop", "train.eval_interval": "3", "train.eval_steps": "2"}
    records = {}
    for name, (pipeline, tensor) in (("single", (1, 1)), ("pp2", (2, 1))):
        save_dir = tmp_path / name
        run_distributed(_train, pipeline * tensor,
                        argv(tiny_corpus_data, save_dir, "narrow", pipeline, tensor, **extra),
                        init_process_group=False, timeout=400, env={"DS_ACCELERATOR": "cpu"})
        records[name] = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {name: [r["eval_loss"] for r in rs if "eval_loss" in r] for name, rs in records.items()}
    assert len(evals["single"]) == STEPS // 3 and len(evals["pp2"]) == STEPS // 3
    trains = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in records.items()}
    for key, values in (("eval", evals), ("train", trains)):
        for step, (a, b) in enumerate(zip(values["single"], values["pp2"], strict=True)):
            assert abs(a - b) <= TOL, f"{key} loss {step}: one process {a!r}, PP=2 {b!r}"


def test_pipeline_nonfinite_loss_is_skipped_and_counted(tmp_path, tiny_corpus_data):
    """An absurd learning rate makes every loss after step 1 NaN: under train.nonfinite_loss=skip the pipeline's
    ZeRO-1 optimizer skips those updates, every rank counts them, and no weight or importance turns non-finite."""
    import math

    import torch

    save_dir = tmp_path / "run"
    run_distributed(_train, 2, argv(tiny_corpus_data, save_dir, "token_drop", 2, 1, **{
        "train.lr": "1.0e+30", "train.nonfinite_loss": "skip", "train.train_steps": "3"}),
        init_process_group=False, timeout=400, env={"DS_ACCELERATOR": "cpu"})
    logged = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert math.isfinite(logged[0]["loss"]) and all(r["loss"] is None for r in logged[1:])
    assert [r["skipped_steps"] for r in logged] == [0, 1, 2]
    step = save_dir / "checkpoints" / latest(save_dir)
    tensors = {f"{file.name}:{key}": value for file in step.glob("layer_*-model_states.pt")
               for key, value in torch.load(file, map_location="cpu", weights_only=False).items()}
    assert any("token_importance" in name for name in tensors)
    broken = [name for name, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
    assert not broken, f"non-finite after skipped steps: {broken}"


def test_pipeline_with_data_parallelism_equals_one_process(tmp_path, tiny_corpus_data):
    """PP=2 x DP=2 (four ranks): the two replicas split each global batch of 16; losses (and through them the
    token-drop importance, reduced over the replicas) equal one process taking the batch as 2 x 8."""
    values = {}
    for name, world in (("single", 1), ("pp2_dp2", 4)):
        save_dir = tmp_path / name
        run_distributed(_train, world, argv(tiny_corpus_data, save_dir, "token_drop", 2 if world > 1 else 1, 1),
                        init_process_group=False, timeout=400, env={"DS_ACCELERATOR": "cpu"})
        values[name] = losses(save_dir)
    assert sorted(values["pp2_dp2"]) == list(range(1, STEPS + 1))
    for step, expected in values["single"].items():
        got = values["pp2_dp2"][step]
        assert abs(got - expected) <= TOL, f"step {step}: PP=2 x DP=2 {got!r}, one process {expected!r}"


def test_pipeline_starts_from_hugging_face_weights(tmp_path, tiny_corpus_data):
    """train.init_from_hf under PP=2: each stage loads its items' tensors (both copies of the tied embeddings),
    and the losses equal one process started from the same directory (and differ from a fresh start)."""
    from megatron_narrow.config import ModelConfig
    from megatron_narrow.convert.export import export_to_hf
    from megatron_narrow.model import BertForPreTraining

    config = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=64,
                         init_seed=99)  # other weights than a fresh run's
    hf_dir = export_to_hf(BertForPreTraining(config), tmp_path / "hf")
    values = {}
    for name, pipeline, extra in (("single", 1, {"train.init_from_hf": str(hf_dir)}),
                                  ("pp2", 2, {"train.init_from_hf": str(hf_dir)}), ("fresh", 2, {})):
        save_dir = tmp_path / name
        run_distributed(_train, pipeline, argv(tiny_corpus_data, save_dir, "narrow", pipeline, 1,
                                               **{"train.train_steps": "3", **extra}),
                        init_process_group=False, timeout=400, env={"DS_ACCELERATOR": "cpu"})
        values[name] = losses(save_dir)
    for step in (1, 2, 3):
        assert abs(values["pp2"][step] - values["single"][step]) <= TOL, (step, values)
    assert abs(values["fresh"][1] - values["pp2"][1]) > 1e-3, "the Hugging Face weights were not loaded"
