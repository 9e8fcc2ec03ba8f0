"""Pipeline parallelism end to end, through the real entry point: for every variant, PP=2 (two gloo ranks)
and TP=2 x PP=2 (four) train 10 steps with per-step losses equal to one process; PP=2 resumes bit for bit
after SIGKILL; a TP=2 x PP=2 checkpoint converts to Hugging Face with the single-process model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import REPO
from .runs import (
    KILL_AFTER,
    SAVE_EVERY,
    STEPS,
    assert_same_weights,
    kill_once_checkpointed,
    latest,
    losses,
    pretrain_argv,
    records,
    run_to_end,
)

TOL = 1e-5
ZERO1 = str(REPO / "ds_configs/zero1.json")
# one layout per run: name -> (pipeline_parallel, tensor_parallel)
LAYOUTS = {"single": (1, 1), "pp2": (2, 1), "tp2_pp2": (2, 2)}


def argv(data, save_dir: Path, variant: str, pipeline: int, tensor: int, **extra: str) -> list[str]:
    """10 steps of 2 micro-batches (the pipeline schedule interleaves them), dropout off, ZeRO-1."""
    return pretrain_argv(data, save_dir, variant, ds_config=ZERO1, **{
        "model.hidden_dropout": "0.0", "model.attention_dropout": "0.0", "train.global_batch_size": "16",
        "parallel.pipeline_parallel": str(pipeline), "parallel.tensor_parallel": str(tensor), **extra})


def train(data, save_dir: Path, variant: str, pipeline: int, tensor: int, world: int | None = None,
          **extra: str) -> dict[int, float]:
    """Run to the end on pipeline x tensor ranks (or `world`); its per-step losses."""
    run_to_end(argv(data, save_dir, variant, pipeline, tensor, **extra), world=world or pipeline * tensor)
    return losses(save_dir)


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory, tiny_corpus_data):
    """(variant, layout name[, packing]) -> save_dir of a finished 10-step run, made once and shared."""
    made: dict[tuple[str, str, str], Path] = {}

    def get(variant: str, name: str, packing: str = "none") -> Path:
        if (variant, name, packing) not in made:
            save_dir = tmp_path_factory.mktemp(f"pipeline_{variant}_{name}_{packing}")
            train(tiny_corpus_data, save_dir, variant, *LAYOUTS[name], **{"data.packing": packing})
            made[variant, name, packing] = save_dir
        return made[variant, name, packing]

    return get


@pytest.fixture(scope="module", params=["bert", "narrow", "token_drop"])
def runs(request, pipeline_runs) -> dict[str, Path]:
    """layout name -> save_dir of a finished 10-step run of the variant."""
    return {"variant": request.param, **{name: pipeline_runs(request.param, name) for name in LAYOUTS}}


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


def test_packed_segments_under_tp2_pp2_equal_one_process(pipeline_runs):
    """data.packing=segments: segment and position ids travel through the pipeline and the TP layers; the
    per-step losses of TP=2 x PP=2 equal one process's, and packing did pack (rows of several segments). NarrowBERT,
    whose narrow layers take the segments as keys and their targets as queries; every variant's packed rows equal
    their segments run one by one in tests/test_packing.py."""
    variant = "narrow"
    reference = losses(pipeline_runs(variant, "single", "segments"))
    got = losses(pipeline_runs(variant, "tp2_pp2", "segments"))
    assert sorted(reference) == sorted(got) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1], "the tiny packed run must learn"
    for step, value in reference.items():
        assert abs(got[step] - value) <= TOL, f"{variant} step {step}: TP2xPP2 {got[step]!r}, one process {value!r}"
    fractions = [r["real_token_fraction"] for r in records(pipeline_runs(variant, "single", "segments"))
                 if "loss" in r]
    unpacked = [r["real_token_fraction"] for r in records(pipeline_runs(variant, "single")) if "loss" in r]
    assert sum(fractions) / len(fractions) > 0.85 > 0.75 > sum(unpacked) / len(unpacked), (fractions, unpacked)


def test_pipeline_resume_after_sigkill_is_bit_exact(pipeline_runs, tiny_corpus_data):
    """SIGKILL both ranks of a PP=2 run (and their process groups) once step 6 is checkpointed; the resumed
    run says where it resumed and its losses equal the uninterrupted PP=2 run's bit for bit. token_drop, whose
    stage files also carry the importance vector (every variant resumes bit for bit in test_train_resume.py)."""
    runs = {"variant": "token_drop", "pp2": pipeline_runs("token_drop", "pp2")}
    save_dir = runs["pp2"].parent / f"{runs['pp2'].name}_killed"
    # 6, or 9 on a machine slow to deliver the kill
    resume_from = kill_once_checkpointed(argv(tiny_corpus_data, save_dir, runs["variant"], 2, 1), save_dir,
                                         KILL_AFTER, world=2)
    assert resume_from in (KILL_AFTER, KILL_AFTER + SAVE_EVERY) and max(losses(save_dir)) < STEPS

    output = run_to_end(argv(tiny_corpus_data, save_dir, runs["variant"], 2, 1), world=2)
    assert f"resumed from step {resume_from}" in output
    expected, resumed = losses(runs["pp2"]), losses(save_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    for step in range(resume_from + 1, STEPS + 1):
        assert resumed[step] == expected[step], \
            f"{runs['variant']} step {step}: {resumed[step]!r} != {expected[step]!r}"
    assert_same_weights(save_dir, runs["pp2"])


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
    logged = {}
    for name, (pipeline, tensor) in (("single", (1, 1)), ("pp2", (2, 1))):
        train(tiny_corpus_data, tmp_path / name, "narrow", pipeline, tensor, **extra)
        logged[name] = records(tmp_path / name)
    evals = {name: [r["eval_loss"] for r in rs if "eval_loss" in r] for name, rs in logged.items()}
    assert len(evals["single"]) == STEPS // 3 and len(evals["pp2"]) == STEPS // 3
    trains = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in logged.items()}
    for key, values in (("eval", evals), ("train", trains)):
        for step, (a, b) in enumerate(zip(values["single"], values["pp2"], strict=True)):
            assert abs(a - b) <= TOL, f"{key} loss {step}: one process {a!r}, PP=2 {b!r}"


def test_pipeline_nonfinite_loss_is_skipped_and_counted(tmp_path, tiny_corpus_data):
    """An absurd learning rate makes every loss after step 1 NaN: under train.nonfinite_loss=skip the pipeline's
    ZeRO-1 optimizer skips those updates, every rank counts them, and no weight or importance changes."""
    import math

    import torch

    save_dir = tmp_path / "run"
    train(tiny_corpus_data, save_dir, "token_drop", 2, 1, **{
        "train.lr": "1.0e+30", "train.nonfinite_loss": "skip", "train.train_steps": "3", "train.save_interval": "1",
        "train.keep_last": "3"})
    logged = records(save_dir)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert math.isfinite(logged[0]["loss"]) and all(r["loss"] is None for r in logged[1:])
    assert [r["skipped_steps"] for r in logged] == [0, 1, 2]
    assert latest(save_dir) == "step_0000003"

    def tensors(step: int) -> dict:
        return {f"{file.name}:{key}": value
                for file in (save_dir / "checkpoints" / f"step_000000{step}").glob("layer_*-model_states.pt")
                for key, value in torch.load(file, map_location="cpu", weights_only=False).items()}

    after_1, after_3 = tensors(1), tensors(3)
    assert any("token_importance" in name for name in after_3) and sorted(after_1) == sorted(after_3)
    assert all(value.isfinite().all() for value in after_3.values() if value.is_floating_point())
    changed = [name for name in after_3 if not torch.equal(after_1[name], after_3[name])]
    assert not changed, f"skipped steps changed {changed}"


def test_pipeline_with_data_parallelism_equals_one_process(tmp_path, tiny_corpus_data, pipeline_runs):
    """PP=2 x DP=2 (four ranks): the two replicas split each global batch of 16; losses (and through them the
    token-drop importance, reduced over the replicas) equal one process taking the batch as 2 x 8."""
    expected = losses(pipeline_runs("token_drop", "single"))
    got = train(tiny_corpus_data, tmp_path / "pp2_dp2", "token_drop", 2, 1, world=4)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert abs(got[step] - expected[step]) <= TOL, \
            f"step {step}: PP=2 x DP=2 {got[step]!r}, one process {expected[step]!r}"


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
        values[name] = train(tiny_corpus_data, tmp_path / name, "narrow", pipeline, 1,
                             **{"train.train_steps": "3", **extra})
    for step in (1, 2, 3):
        assert abs(values["pp2"][step] - values["single"][step]) <= TOL, (step, values)
    assert abs(values["fresh"][1] - values["pp2"][1]) > 1e-3, "the Hugging Face weights were not loaded"


def test_activation_checkpointing_under_pp2_equals_keeping_everything(tmp_path, tiny_corpus_data):
    """PP=2 with dropout on: train.activation_checkpointing=full recomputes each layer inside its stage and
    draws every dropout mask again identically, so the per-step losses equal the unchecked run's exactly.
    NarrowBERT (its stages hold both kinds of layer); every variant is compared bit for bit in one process and
    under TP=2 in tests/test_recompute.py."""
    variant = "narrow"
    dropout = {"model.hidden_dropout": "0.1", "model.attention_dropout": "0.1", "train.save_interval": "0"}
    kept = train(tiny_corpus_data, tmp_path / "none", variant, 2, 1, **dropout)
    recomputed = train(tiny_corpus_data, tmp_path / "full", variant, 2, 1, **dropout,
                       **{"train.activation_checkpointing": "full"})
    assert sorted(kept) == list(range(1, STEPS + 1))
    assert recomputed == kept, {s: (recomputed.get(s), kept[s]) for s in kept if recomputed.get(s) != kept[s]}


@pytest.mark.parametrize("variant", ["narrow", "token_drop"])
def test_pipeline_checkpoint_resumes_without_a_pipeline(variant, pipeline_runs, tmp_path, tiny_corpus_data):
    """A PP=2 checkpoint resumed with PP=1 goes through DeepSpeed's universal checkpoint with the stage modules'
    parameter names mapped to the model's (and token_drop's importance vector read from the stage files): the
    step after the resume has the uninterrupted run's loss, and its update (Adam moments included) the same
    weights, within 1e-5. (Other changes of stages are refused: test_layout_changes_that_cannot_be_converted.)"""
    from megatron_narrow.convert.checkpoint import load_merged_model, read_checkpoint_info

    from .runs import resume_from

    reference = pipeline_runs(variant, "pp2")  # keep_last 2: steps 9 and 10

    resumed = resume_from(reference, tmp_path / "resumed", 3 * SAVE_EVERY)
    output = run_to_end(argv(tiny_corpus_data, resumed, variant, 1, 1))
    assert "converting it to a universal checkpoint" in output and "resumed from step 9" in output, output[-2000:]
    assert abs(losses(resumed)[STEPS] - losses(reference)[STEPS]) <= TOL
    ours, theirs = (load_merged_model(read_checkpoint_info(d)).state_dict() for d in (resumed, reference))
    assert sorted(ours) == sorted(theirs)
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst <= TOL, f"the weights after the resumed step differ by {worst}"
