"""Activation checkpointing (model/recompute.py): with dropout on, `full` and `selective` give the outputs and
gradients of the unchecked model bit for bit (every dropout mask is drawn again identically, including the
tensor-parallel stream of our RNG tracker) while keeping less for backward; the same under TP=2."""

from __future__ import annotations

import pytest
import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model.recompute import set_activation_checkpointing
from megatron_narrow.parallel import RNGStatesTracker

from .distributed import run_distributed
from .test_model_tp import SPECIAL, VOCAB, batch  # the TP test's batch: padding, a masked-out target

SEED = 11
VARIANTS = ("bert", "narrow", "token_drop")


def config(variant: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                       variant=variant, full_length_layers=1, hidden_dropout=0.1, attention_dropout=0.1,
                       token_drop_keep_ratio=0.5)


def train_step(variant: str, mode: str, groups=None, tensor_rank: int = 0) -> tuple[dict, int]:
    """(loss and every gradient, bytes autograd kept for backward) of one forward/backward in training
    mode, dropout drawn from a fresh tracker seeded like a run's."""
    tracker = RNGStatesTracker.for_model(SEED, tensor_rank=tensor_rank)  # also seeds the global stream
    model = BertForPreTraining(config(variant), groups, special_ids=SPECIAL, tracker=tracker).train()
    set_activation_checkpointing(model, mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch())
    out.loss.backward()
    result = {"loss": out.loss.detach()}
    result.update({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
    return result, sum(kept.values())


def assert_same(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name} differs by {(actual[name] - value).abs().max()}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_recompute_equals_keeping_everything_with_dropout_on(variant):
    reference, kept_all = train_step(variant, "none")
    for mode in ("full", "selective"):
        result, kept = train_step(variant, mode)
        assert_same(result, reference, f"{variant} {mode}")
        assert kept < kept_all, f"{variant} {mode} kept {kept} bytes, no less than {kept_all}"
    # dropout is on: a model that draws its masks again differently would not be equal
    tracker = RNGStatesTracker.for_model(SEED + 1, tensor_rank=0)
    other = BertForPreTraining(config(variant), special_ids=SPECIAL, tracker=tracker).train()
    assert not torch.equal(other(*batch()).loss.detach(), reference["loss"])


def _tp_rank(rank: int, world_size: int) -> dict:
    from megatron_narrow.config import ParallelConfig
    from megatron_narrow.parallel import ProcessGroups

    groups = ProcessGroups.from_world(ParallelConfig(tensor_parallel=world_size))
    differences = {}
    for variant in VARIANTS:
        reference, _ = train_step(variant, "none", groups, tensor_rank=rank)
        for mode in ("full", "selective"):
            result, _ = train_step(variant, mode, groups, tensor_rank=rank)
            differences[f"{variant}/{mode}"] = max((result[k] - v).abs().max().item() for k, v in reference.items())
    return differences


def test_recompute_equals_keeping_everything_under_tp2():
    for rank, differences in enumerate(run_distributed(_tp_rank, 2)):
        assert set(differences) == {f"{v}/{m}" for v in VARIANTS for m in ("full", "selective")}
        for name, difference in differences.items():
            assert difference == 0.0, f"rank {rank} {name}: differs by {difference}"
