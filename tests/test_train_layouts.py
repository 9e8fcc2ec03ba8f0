"""Promises of the training loop under every layout it supports, on warm ranks (tests/runs.py):

- exact resume from a mid-run checkpoint with DP=2, TP=2, ZeRO-2 partitioned optimizer state, bf16, fp16 with
  a dynamic loss scale that moved before the checkpoint, and DataLoader workers: the losses (and skipped
  steps) after the resume equal the uninterrupted run's bit for bit;
- TP=2 x DP=2 equals one process with the same global batch per step at 1e-5;
- tensorboard events hold what metrics.jsonl holds; weight decay skips biases and LayerNorm weights.
"""

from __future__ import annotations

import json

import pytest

from .conftest import REPO
from .runs import (
    STEPS,
    allow_fp16_on_this_cpu,
    assert_same_weights,
    losses,
    pretrain_argv,
    records,
    resume_from,
    run_to_end,
)

NO_DROPOUT = {"model.hidden_dropout": "0.0", "model.attention_dropout": "0.0"}
# name -> (ranks, DeepSpeed config, overrides); checkpoints every 3 steps, all kept
LAYOUTS = {
    "dp2": (2, "zero0.json", {}),
    "tp2": (2, "zero0.json", {"parallel.tensor_parallel": "2"}),
    "zero2_dp2": (2, "zero2.json", {}),
    "bf16_zero1": (1, "zero1.json", {"train.precision": "bf16"}),
    "num_workers_1": (1, "zero0.json", {"train.num_workers": "1"}),
    "fp16_zero1": (1, "zero1.json", {"train.precision": "fp16"}),
}
# fp16: a loss scale of 2^20 overflows (steps skipped) and halves; a window of 2 doubles it again every two good
# steps, so the scaler's state at step 6 differs from a fresh one's: a resume that lost it skips other steps
FP16_SCALER = {"initial_scale_power": 20, "loss_scale_window": 2, "hysteresis": 1}


def ds_config_for(name: str, ds_name: str, tmp_path) -> str:
    path = REPO / "ds_configs" / ds_name
    if not name.startswith("fp16"):
        return str(path)
    config = json.loads(path.read_text())
    config["fp16"] = {**config.get("fp16", {}), **FP16_SCALER}
    custom = tmp_path / f"{name}.json"
    custom.write_text(json.dumps(config))
    return str(custom)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_from_a_mid_run_checkpoint_is_bit_exact(name, tmp_path, tiny_corpus_data):
    ranks, ds_name, extra = LAYOUTS[name]
    settings = {"train.keep_last": "10", **extra}
    reference = tmp_path / "reference"
    ds_config = ds_config_for(name, ds_name, tmp_path)
    fp16 = extra.get("train.precision") == "fp16"
    before_main = allow_fp16_on_this_cpu if fp16 else None
    run_to_end(pretrain_argv(tiny_corpus_data, reference, "token_drop", ds_config=ds_config, **settings),
                    world=ranks, before_main=before_main)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1)) and expected[STEPS] < expected[1]
    skipped = [r["skipped_steps"] for r in records(reference)]
    if fp16:
        assert 0 < skipped[5] < 6, f"the loss scale must have overflowed before step 6: {skipped}"

    resumed = resume_from(reference, tmp_path / "resumed", 6)
    output = run_to_end(pretrain_argv(tiny_corpus_data, resumed, "token_drop", ds_config=ds_config, **settings),
                             world=ranks, before_main=before_main)
    assert "resumed from step 6" in output
    assert losses(resumed) == expected, f"{name}: the steps after the resume differ from the uninterrupted run"
    for key in ("consumed_samples", "skipped_steps"):
        assert [r[key] for r in records(resumed)] == [r[key] for r in records(reference)], key
    assert_same_weights(resumed, reference)  # the last update too, which no logged loss shows


SINGLE_NO_DROPOUT = {**NO_DROPOUT, "train.train_steps": "4", "train.micro_batch_size": "16",
                     "train.save_interval": "0"}


@pytest.fixture(scope="module")
def single_no_dropout(tmp_path_factory, tiny_corpus_data) -> dict[int, float]:
    """Losses of a 4-step narrow run in one eager fp32 process without dropout, global batch 16: the reference
    of the layout and compile tests below."""
    save_dir = tmp_path_factory.mktemp("single_no_dropout")
    run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **SINGLE_NO_DROPOUT))
    return losses(save_dir)


def test_tensor_and_data_parallel_equal_one_process(tmp_path, tiny_corpus_data, single_no_dropout):
    """Four ranks as TP=2 x DP=2: each step's loss equals one process with the same global batch of 16."""
    parallel = tmp_path / "tp2_dp2"
    run_to_end(pretrain_argv(tiny_corpus_data, parallel, "narrow", **{
        **NO_DROPOUT, "train.train_steps": "4", "parallel.tensor_parallel": "2", "train.save_interval": "0"}), world=4)
    a, b = single_no_dropout, losses(parallel)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, f"step {step}: one process {a[step]!r}, TP2 x DP2 {b[step]!r}"


def test_compiled_model_trains_to_the_eager_losses(tmp_path, tiny_corpus_data, single_no_dropout):
    """model.compile=true (DeepSpeed's engine.compile, inductor): the same four fp32 losses as eager within 1e-5
    (inductor fuses and reorders elementwise work: not bit for bit)."""
    compiled = tmp_path / "compiled"
    output = run_to_end(pretrain_argv(tiny_corpus_data, compiled, "narrow", **{
        **SINGLE_NO_DROPOUT, "model.compile": "true"}))
    assert "model.compile=true: torch.compile" in output, output[-2000:]
    a, b = single_no_dropout, losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, f"step {step}: eager {a[step]!r}, compiled {b[step]!r}"


def test_tensorboard_events_hold_the_logged_metrics(reference_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_dir = reference_runs("narrow")
    events = EventAccumulator(str(save_dir / "tensorboard"))
    events.Reload()
    logged = {r["step"]: r for r in records(save_dir) if "loss" in r}
    for key in ("loss", "lr", "consumed_samples"):
        scalars = {event.step: event.value for event in events.Scalars(f"train/{key}")}
        assert sorted(scalars) == sorted(logged), key
        for step, value in scalars.items():
            assert value == pytest.approx(logged[step][key], rel=1e-6), (key, step)  # stored as float32


def test_weight_decay_skips_biases_and_layer_norms():
    from megatron_narrow.config import ModelConfig, TrainConfig
    from megatron_narrow.model import BertForPreTraining
    from megatron_narrow.training.optim import build_optimizer

    model = BertForPreTraining(ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                           max_position_embeddings=16, variant="narrow"))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in plain), sorted(plain)
    assert all(n.endswith(".weight") and "LayerNorm" not in n for n in decayed), sorted(decayed)
    assert "bert.embeddings.word_embeddings.weight" in decayed


ODD_VOCAB = {"model.vocab_size": "1100"}  # odd_vocab_corpus_data: padded to 1280 rows at TP=2, 1152 at TP=1
# name -> (variant, DeepSpeed config, saved on (ranks, overrides), resumed on (ranks, overrides)); global batch 16
LAYOUT_CHANGES = {
    "dp2_to_dp1_zero1": ("token_drop", "zero1.json", (2, {}), (1, {})),
    "dp1_to_dp2_zero1": ("token_drop", "zero1.json", (1, {}), (2, {})),
    "dp2_to_dp1_zero2": ("narrow", "zero2.json", (2, {}), (1, {})),
    "dp1_to_dp2_zero2": ("narrow", "zero2.json", (1, {}), (2, {})),
    "tp2_to_tp1_zero1_repadded": ("token_drop", "zero1.json", (2, {"parallel.tensor_parallel": "2", **ODD_VOCAB}),
                                  (1, ODD_VOCAB)),
}


@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
def test_resume_on_another_layout_equals_the_uninterrupted_run(change, tmp_path, request):
    """A checkpoint of one DP x TP layout resumes on another through DeepSpeed's universal checkpoint (converted
    automatically, said in one line): the losses after the resume equal the uninterrupted run's within 1e-5
    (dropout off: DP replicas share dropout seeds, so masks depend on the layout; the global batch is kept).
    token_drop's importance vector, a buffer DeepSpeed's universal load skips, comes back too; so does the MLM
    bias when the vocabulary padding changes with TP (DeepSpeed re-pads only 2-D vocabulary tensors)."""
    variant, ds_name, (saved_ranks, saved_extra), (resumed_ranks, resumed_extra) = LAYOUT_CHANGES[change]
    tiny_corpus_data = request.getfixturevalue("odd_vocab_corpus_data" if ODD_VOCAB.items() <= saved_extra.items()
                                               else "tiny_corpus_data")
    common = {**NO_DROPOUT, "train.keep_last": "10", "train.global_batch_size": "16"}
    ds_config = str(REPO / "ds_configs" / ds_name)
    reference = tmp_path / "reference"
    run_to_end(pretrain_argv(tiny_corpus_data, reference, variant, ds_config=ds_config,
                                  **common, **saved_extra), world=saved_ranks)
    expected = losses(reference)
    resumed = resume_from(reference, tmp_path / "resumed", 6)
    output = run_to_end(pretrain_argv(tiny_corpus_data, resumed, variant, ds_config=ds_config,
                                           **common, **resumed_extra), world=resumed_ranks)
    assert "converting it to a universal checkpoint" in output and "resumed from step 6" in output, output[-2000:]
    got = losses(resumed)
    assert sorted(got) == sorted(expected)
    for step, value in expected.items():
        assert abs(got[step] - value) <= 1e-5, f"{change} step {step}: resumed {got[step]!r}, uninterrupted {value!r}"
    assert [r["consumed_samples"] for r in records(resumed)] == [r["consumed_samples"] for r in records(reference)]
    assert not list((resumed / "checkpoints").glob("*_universal")), "the conversion outlived the next save"


def test_layout_changes_that_cannot_be_converted_are_named():
    """Which changes go through a universal checkpoint, which load as they are, which are refused (and why)."""
    from megatron_narrow.training.layout import current_layout, layout_change_refusal, needs_conversion

    def layout(dp=1, tp=1, pp=1, zero=1):
        return current_layout(dp, tp, pp, zero)

    assert not needs_conversion(layout(), layout())
    assert not needs_conversion(layout(dp=2, zero=0), layout(zero=0))  # replicated state loads as it is
    assert needs_conversion(layout(dp=2), layout()) and layout_change_refusal(layout(dp=2), layout(), "t") is None
    refusals = {  # name -> (saved, current, what the line says)
        "more_stages": (layout(pp=2), layout(pp=4), "resume with parallel.pipeline_parallel=2 (or 1)"),
        "into_a_pipeline": (layout(), layout(pp=2), "resume with parallel.pipeline_parallel=1"),
        "zero0_tp": (layout(tp=2, zero=0), layout(zero=0), "both runs need ZeRO stage >= 1"),
        "into_zero0": (layout(dp=2), layout(zero=0), "both runs need ZeRO stage >= 1"),
    }
    for name, (saved, current, expected) in refusals.items():
        line = layout_change_refusal(saved, current, "step_0000006")
        assert line is not None and expected in line and "\n" not in line, (name, line)
    assert layout_change_refusal(layout(tp=2), layout(), "t") is None
    assert layout_change_refusal(layout(pp=2, tp=2), layout(), "t") is None
