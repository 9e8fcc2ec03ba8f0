"""Every DeepSpeed JSON in ds_configs/ (globbed: a new file is tested without touching this module) passes
DeepSpeed's own config parser once our run config has completed it (fp32, bf16 and fp16, one and two
data-parallel ranks), and trains on the CPU: fp32 with two ranks, bf16 with one, fp16 once (DeepSpeed's CPU
accelerator is told to accept fp16 where it has no oneDNN fp16 kernels: tests/runs.py allow_fp16_on_this_cpu).

Each training run is `python megatron_narrow/pretrain.py` in processes of its own (one per rank, with the
environment torchrun would give), so no DeepSpeed or torch.distributed state leaks between configs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .conftest import REPO
from .runs import allow_fp16_on_this_cpu, pretrain_argv, run_to_end

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
IDS = [path.stem for path in CONFIGS]
STEPS = 4


def zero_stage(path: Path) -> int:
    return int((json.loads(path.read_text()).get("zero_optimization") or {}).get("stage", 0))


def test_every_config_is_documented():
    assert CONFIGS, "ds_configs/ holds no JSON"
    readme = (REPO / "ds_configs" / "README.md").read_text()
    for path in CONFIGS:
        assert f"`{path.name}`" in readme, f"{path.name} is missing from the table in ds_configs/README.md"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_leaves_batch_optimizer_and_precision_to_the_run_config(path):
    raw = json.loads(path.read_text())
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
             "scheduler", "gradient_clipping"}
    assert not owned & set(raw), f"{path.name} sets {sorted(owned & set(raw))}: the run config owns them"
    for section in ("bf16", "fp16"):
        assert "enabled" not in (raw.get(section) or {}), f"{path.name}: train.precision switches {section}"
    assert "zero_optimization" in raw
    if "offload_param" in raw["zero_optimization"]:  # DeepSpeed's parser accepts it anywhere, stage 3 uses it
        assert zero_stage(path) == 3, f"{path.name}: offload_param needs ZeRO stage 3"


class _DataParallelOnly:
    """The one question DeepSpeedConfig asks an mpu: the data-parallel world size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


@pytest.mark.parametrize("data_parallel", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_deepspeed_parses_the_completed_config(path, precision, data_parallel, monkeypatch):
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    from megatron_narrow.config import load_run_config
    from megatron_narrow.training.setup import deepspeed_config

    run = load_run_config(str(REPO / "examples/configs/tiny_cpu.yaml"),
                          [f"train.precision={precision}", "train.micro_batch_size=4", "train.global_batch_size=32"])
    if precision == "fp16" and zero_stage(path) == 0:
        with pytest.raises(ValueError, match="DeepSpeed#8393"):
            deepspeed_config(str(path), run, data_parallel)
        return
    completed = deepspeed_config(str(path), run, data_parallel)
    # DeepSpeedConfig asks the process group for the rank; without one it would assume a world of 1
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    parsed = DeepSpeedConfig(completed, mpu=_DataParallelOnly(data_parallel))

    raw = json.loads(path.read_text())
    assert parsed.world_size == data_parallel
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu) == (32, 4)
    assert parsed.gradient_accumulation_steps == 32 // (4 * data_parallel)
    assert parsed.zero_optimization_stage == zero_stage(path)
    assert parsed.gradient_clipping == run.train.clip_grad
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.optimizer_name is None and parsed.scheduler_name is None
    if precision == "fp16":  # the JSON's loss-scale settings survive our switch
        for key, value in raw["fp16"].items():
            assert getattr(parsed.float16_config, key) == value, key
    zero = raw["zero_optimization"]
    for kind in ("offload_optimizer", "offload_param"):
        offload = getattr(parsed.zero_config, kind)
        if kind in zero:
            assert offload is not None and offload.device == zero[kind]["device"]
        else:
            assert offload is None or offload.device == "none"


def train(save_dir: Path, data, config: Path, precision: str, ranks: int, **extra: str) -> list[dict]:
    """STEPS optimizer steps on the CPU, dropout off; the records of metrics.jsonl."""
    run_to_end(pretrain_argv(data, save_dir, ds_config=str(config), **{
        "train.train_steps": str(STEPS), "train.precision": precision, "train.save_interval": "0",
        "model.hidden_dropout": "0.0", "model.attention_dropout": "0.0", **extra}), world=ranks,
        before_main=allow_fp16_on_this_cpu if precision == "fp16" else None)
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


_LOSSES: dict[tuple[str, str, int], list[float]] = {}


def losses_of(tmp_path_factory, data, name: str, precision: str, ranks: int) -> list[float]:
    """Train once per (config, precision, ranks) in this session; the reference runs are shared."""
    key = (name, precision, ranks)
    if key not in _LOSSES:
        save_dir = tmp_path_factory.mktemp(f"{name}_{precision}_{ranks}") / "run"
        records = train(save_dir, data, REPO / "ds_configs" / f"{name}.json", precision, ranks)
        assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
        assert all(r["skipped_steps"] == 0 for r in records if "loss" in r)
        _LOSSES[key] = [r["loss"] for r in records if "loss" in r]
    return _LOSSES[key]


# Every file in fp32 with two ranks (ZeRO partitions for real) and in bf16 with one (DeepSpeed's CPU accelerator
# always has bf16); fp16 once (the parser test covers every file in fp16).
RUNS = ([pytest.param(path, "fp32", 2, id=f"{path.stem}-fp32-2ranks") for path in CONFIGS]
        + [pytest.param(path, "bf16", 1, id=f"{path.stem}-bf16-1rank") for path in CONFIGS]
        + [pytest.param(REPO / "ds_configs/zero1.json", "fp16", 1, id="zero1-fp16-1rank")])


def bf16_half_ulp(value: float) -> float:
    """Half the spacing of bf16 numbers around `value`: how far a bf16 rounding of it may move."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 8)


@pytest.mark.parametrize(("path", "precision", "ranks"), RUNS)
def test_config_trains_on_the_cpu(path, precision, ranks, tmp_path_factory, tiny_corpus_data):
    """Dropout off, so that every comparison is of arithmetic alone.
    - fp32: every stage is the same maths as ZeRO-0 on one rank (two ranks here): equal at 1e-5.
    - bf16: ZeRO-1 and ZeRO-2 (offload too) run DeepSpeed's one ZeRO optimizer with fp32 masters: equal to ZeRO-1 at
      1e-6. ZeRO-3 and ZeRO-0 (BF16_Optimizer) keep fp32 masters too but round and reduce gradients their own way,
      and where two masters straddle a bf16 rounding boundary the bf16 weights differ by a whole ulp: within
      half a bf16 ulp of ZeRO-1's loss, as against fp32 below (measured 1.9e-4 at step 2 on an AVX2 CPU, whose
      emulated bf16 products round differently from oneDNN's; 2u x the path the loss has travelled, 1.6e-4
      there, held on an AMX CPU but is no bound: it leaves out that rounding of the weights).
    - bf16 against fp32 (ZeRO-1): every step's loss within half a bf16 ulp of the fp32 loss (2^-6 for losses in
      [4, 8)), what storing that loss in bf16 alone could change; measured 1.2e-4 at step 1, 7.5e-4 at step 4."""
    losses = losses_of(tmp_path_factory, tiny_corpus_data, path.stem, precision, ranks)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], f"{path.name} {precision} did not learn: {losses}"
    if precision == "fp32":
        reference = losses_of(tmp_path_factory, tiny_corpus_data, "zero0", "fp32", ranks)
        assert losses == pytest.approx(reference, abs=1e-5), f"{path.name} fp32 differs from zero0.json: {losses}"
    if precision != "bf16":
        return
    reference = losses_of(tmp_path_factory, tiny_corpus_data, "zero1", "bf16", 1)
    for step, (got, expected) in enumerate(zip(losses, reference, strict=True), start=1):
        tolerance = 1e-6 if zero_stage(path) in (1, 2) else bf16_half_ulp(expected)
        assert abs(got - expected) <= tolerance, (
            f"{path.name} bf16 step {step}: {got!r}, zero1.json {expected!r} (tolerance {tolerance:.1e})")
    fp32 = losses_of(tmp_path_factory, tiny_corpus_data, "zero1", "fp32", 1)  # the same global batch
    for step, (got, expected) in enumerate(zip(losses, fp32, strict=True), start=1):
        assert abs(got - expected) <= bf16_half_ulp(expected), (
            f"{path.name} step {step}: bf16 {got!r}, fp32 {expected!r}")


def test_activation_checkpointing_under_zero2_equals_keeping_everything(tmp_path, tiny_corpus_data,
                                                                         tmp_path_factory):
    """train.activation_checkpointing=full with ZeRO-2 on two ranks (gradients of recomputed layers reduced and
    partitioned): the per-step losses equal the run that keeps every activation, bit for bit."""
    kept = losses_of(tmp_path_factory, tiny_corpus_data, "zero2", "fp32", 2)
    records = train(tmp_path / "full", tiny_corpus_data, REPO / "ds_configs/zero2.json", "fp32", 2,
                    **{"train.activation_checkpointing": "full"})
    assert [r["loss"] for r in records if "loss" in r] == kept


def test_lamb_run_follows_the_update_rule_step_by_step(tmp_path, tiny_corpus_data):
    """train.optimizer=lamb in a real run (ZeRO-0, fp32, checkpoints after every step): for each of steps 2-4 the
    saved weights equal LAMB's rule (tests/test_lamb.py's by-hand form, here in float64 over every tensor)
    applied to the previous checkpoint's weights and moments, with the gradient the moments imply and the
    schedule's learning rate; the second moment agrees with that gradient. LAMB takes lr 0.05 here: it moves a
    tensor by ~lr of its own norm, so the tiny config's 2e-3 would barely move 0.02-scale weights."""
    import torch

    from megatron_narrow.config import ModelConfig, TrainConfig
    from megatron_narrow.model import BertForPreTraining
    from megatron_narrow.training.optim import lr_multiplier, parameter_groups

    save_dir = tmp_path / "lamb"
    run_to_end(pretrain_argv(tiny_corpus_data, save_dir, ds_config=str(REPO / "ds_configs/zero0.json"), **{
        "train.train_steps": str(STEPS), "train.optimizer": "lamb", "train.lr": "0.05", "train.save_interval": "1",
        "train.keep_last": "10"}), world=1)
    states = [torch.load(save_dir / f"checkpoints/step_{step:07d}/mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=False) for step in range(1, STEPS + 1)]
    run = json.loads((save_dir / f"checkpoints/step_{STEPS:07d}/run_config.json").read_text())
    config = TrainConfig(**run["train"])
    groups = states[0]["optimizer"]["param_groups"]
    assert {"min_trust", "max_trust"} <= set(groups[0]), "the run did not use LAMB"
    b1, b2 = groups[0]["betas"]
    # the optimizer's parameter order is parameter_groups()' order over the model the run built
    model = BertForPreTraining(ModelConfig(**run["model"]))
    param_names = {id(p): n for n, p in model.named_parameters()}
    names = [param_names[id(p)] for group in parameter_groups(model, config.weight_decay) for p in group["params"]]
    ids = [i for group in groups for i in group["params"]]
    assert len(ids) == len(names)
    moved = 0.0
    for step in range(2, STEPS + 1):
        before, after = states[step - 2], states[step - 1]
        lr = config.lr * lr_multiplier(step - 1, config)
        for group in groups:
            for index in group["params"]:
                name = names[ids.index(index)]
                x = before["module"][name].double()
                m0, v0 = (before["optimizer"]["state"][index][k].double() for k in ("exp_avg", "exp_avg_sq"))
                m1, v1 = (after["optimizer"]["state"][index][k].double() for k in ("exp_avg", "exp_avg_sq"))
                grad = (m1 - b1 * m0) / (1 - b1)
                torch.testing.assert_close(v1, b2 * v0 + (1 - b2) * grad * grad, rtol=1e-5, atol=1e-12)
                r = (m1 / (1 - b1 ** step)) / ((v1 / (1 - b2 ** step)).sqrt() + group["eps"])
                r = r + group["weight_decay"] * x
                trust = min(max(x.norm() / r.norm(), group["min_trust"]), group["max_trust"])
                expected = x - lr * trust * r
                got = after["module"][name].double()
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * (1 + x.abs().max().item()),
                                           msg=lambda text, name=name, step=step: f"{name} step {step}: {text}")
                moved = max(moved, (got - x).abs().max().item())
    assert moved > 1e-3, "the updates must be far larger than the tolerance"



LONG_STEPS = 100


def test_bf16_run_follows_the_fp32_run_for_100_steps(tmp_path, tiny_corpus_data):
    """train.precision=bf16 (ZeRO-1: bf16 weights and activations, fp32 masters) against fp32, 100 steps of one
    seed with dropout on. Both draw the same batches and the same dropout masks (model/dropout.py draws integers
    from the default generator: the masks do not depend on the dtype), so the runs differ by bf16 arithmetic
    alone. Tolerance: at every step, half a bf16 ulp of the fp32 loss (2^-6 for losses in [4, 8)): no more than
    storing the fp32 loss in bf16 could change it. Rounding errors that compounded over the steps instead of
    being corrected by training would cross it; measured 2.4e-3 at most (step 63), 6e-4 on average."""
    losses = {}
    for precision in ("fp32", "bf16"):
        save_dir = tmp_path / precision
        run_to_end(pretrain_argv(tiny_corpus_data, save_dir, ds_config=str(REPO / "ds_configs/zero1.json"), **{
            "train.train_steps": str(LONG_STEPS), "train.precision": precision, "train.save_interval": "0",
            "train.micro_batch_size": "4"}), world=1)
        records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in records if "loss" in r]
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert len(fp32) == len(bf16) == LONG_STEPS
    assert sum(fp32[-10:]) < sum(fp32[:10]) - 5, f"fp32 did not learn: {fp32[:10]} ... {fp32[-10:]}"
    for step, (got, expected) in enumerate(zip(bf16, fp32, strict=True), start=1):
        assert abs(got - expected) <= bf16_half_ulp(expected), f"step {step}: bf16 {got!r}, fp32 {expected!r}"
