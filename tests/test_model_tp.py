"""Tensor parallelism: TP=2 (two gloo processes) equals one process for all three variants, in the
logits and in every parameter's gradient."""

from __future__ import annotations

import pytest
import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.parallel import merge_tensor_parallel, tensor_parallel_dims

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 250  # padded to 256 at TP=1 and 512 at TP=2: padding lands in both TP shards' ranges


def config(variant: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                       variant=variant, hidden_dropout=0.0, attention_dropout=0.0, token_drop_keep_ratio=0.5)


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    ids[mask == 0] = 0
    ids[:, 0] = SPECIAL["cls"]
    positions = torch.stack([torch.randperm(12, generator=g)[:5] + 1 for _ in range(3)])
    targets = torch.randint(5, VOCAB, positions.shape, generator=g)
    valid = torch.ones_like(positions, dtype=torch.bool)
    valid[2, 4] = False
    return ids, mask, torch.zeros_like(ids), positions, targets, valid


def step(model: BertForPreTraining):
    """(loss, logits, gradients). One rank trains through the fused loss, which makes no logits; TP=2 through
    logits and the vocabulary-parallel loss: the comparison covers both. Logits come from a no-grad forward."""
    out = model(*batch())
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(*batch()).logits
    return out.loss.item(), logits, grads


def _tp_rank(rank: int, world_size: int, variant: str):
    from megatron_narrow.config import ParallelConfig
    from megatron_narrow.parallel import ProcessGroups

    groups = ProcessGroups.from_world(ParallelConfig(tensor_parallel=world_size))
    model = BertForPreTraining(config(variant), groups, special_ids=SPECIAL)
    loss, logits, grads = step(model)
    return loss, logits, grads, tensor_parallel_dims(model)


@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
def test_tp2_equals_tp1(variant):
    from .distributed import run_distributed

    reference = BertForPreTraining(config(variant), special_ids=SPECIAL)
    loss, logits, grads = step(reference)
    ranks = run_distributed(_tp_rank, 2, variant)
    dims = ranks[0][3]
    assert dims, "the model must have tensor-parallel parameters"

    for rank_loss, *_ in ranks:
        assert abs(rank_loss - loss) <= 1e-5
    tp_logits = torch.cat([r[1] for r in ranks], dim=-1)[..., :VOCAB]
    assert (tp_logits - logits[..., :VOCAB]).abs().max() <= 1e-5

    replicated = [name for name in ranks[0][2] if name not in dims]
    assert replicated, "LayerNorms, biases and embeddings are replicated"
    for name in replicated:  # the merge below reads rank 0's copy: rank 1's must be the same
        diff = (ranks[1][2][name] - ranks[0][2][name]).abs().max().item()
        assert diff <= 1e-6, f"{variant}: rank 1's gradient of replicated {name} differs from rank 0's by {diff}"
    merged = merge_tensor_parallel([r[2] for r in ranks], dims)
    assert merged.keys() == grads.keys()
    for name, grad in grads.items():
        tp_grad = merged[name]
        if tp_grad.shape != grad.shape:  # vocabulary rows: padded further at TP=2, padding gets no gradient
            assert tp_grad[grad.shape[0]:].abs().max() == 0, name
            tp_grad = tp_grad[: grad.shape[0]]
        diff = (tp_grad - grad).abs().max().item()
        assert diff <= 1e-5, f"{variant}: gradient of {name} differs by {diff}"


@pytest.mark.parametrize("variant", ["bert", "narrow"])
def test_fused_loss_equals_the_logits_path(variant):
    """One rank trains through the fused decoder + loss (no logits); with a pair head and gradient
    accumulation's loss scale, its loss and every gradient equal the logits-then-cross-entropy path's."""
    results = []
    for return_logits in (False, True):
        model = BertForPreTraining(config(variant), special_ids=SPECIAL, pair_head=True)
        out = model(*batch(), pair_label=torch.tensor([0, 1, 1]), return_logits=return_logits)
        (out.loss / 4).backward()
        assert (out.logits is None) != return_logits
        results.append((out.loss.detach(), out.target_losses,
                        {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (fused_loss, fused_losses, fused_grads), (loss, losses, grads) = results
    assert abs(fused_loss - loss) <= 1e-6 and (fused_losses - losses).abs().max() <= 1e-6
    assert fused_grads.keys() == grads.keys() and "cls.seq_relationship.weight" in grads
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= 1e-6, name
