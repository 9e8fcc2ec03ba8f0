"""Token dropping: keep-all equals BERT, kept sets, the importance EMA, state dict, data-parallel sync."""

from __future__ import annotations

import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model.token_drop import PINNED_HIGH, PINNED_LOW, TokenImportance
from megatron_narrow.parallel import GroupInfo

from .distributed import run_distributed

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 300


def tiny(variant: str, **overrides) -> ModelConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_layers=6, num_heads=4, variant=variant,
                    hidden_dropout=0.0, attention_dropout=0.0)
    settings.update(overrides)
    return ModelConfig(**settings)


def toy_batch(seed: int = 0, batch: int = 3, seq: int = 24, targets: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    ids[mask == 0] = SPECIAL["pad"]
    ids[:, 0] = SPECIAL["cls"]
    lengths = mask.sum(1)
    ids[torch.arange(batch), lengths - 1] = SPECIAL["sep"]
    ids[0, 5] = SPECIAL["unk"]
    positions = torch.stack([torch.randperm(int(n) - 2, generator=g)[:targets] + 1 for n in lengths])
    target_ids = ids.gather(1, positions)
    ids.scatter_(1, positions[:, :2], SPECIAL["mask"])
    valid = torch.ones_like(positions, dtype=torch.bool)
    valid[2, -1] = False
    return ids, mask, torch.zeros_like(ids), positions, target_ids, valid


def test_keep_all_equals_bert():
    batch = toy_batch()
    bert = BertForPreTraining(tiny("bert"), special_ids=SPECIAL).eval()
    drop = BertForPreTraining(tiny("token_drop", token_drop_keep_ratio=1.0), special_ids=SPECIAL).eval()
    drop.load_state_dict(bert.state_dict(), strict=False)
    with torch.no_grad():
        a, b = bert(*batch), drop(*batch)
    assert (a.logits - b.logits)[..., :VOCAB].abs().max() <= 1e-6
    assert (a.loss - b.loss).abs() <= 1e-6


def test_dropping_changes_the_output_but_keeps_shapes():
    batch = toy_batch()
    bert = BertForPreTraining(tiny("bert"), special_ids=SPECIAL).eval()
    drop = BertForPreTraining(tiny("token_drop", token_drop_keep_ratio=0.5), special_ids=SPECIAL).eval()
    drop.load_state_dict(bert.state_dict(), strict=False)
    with torch.no_grad():
        a, b = bert(*batch), drop(*batch)
    assert a.logits.shape == b.logits.shape
    assert (a.logits - b.logits)[..., :VOCAB].abs().max() > 1e-4  # 100x the keep-all agreement above


def test_kept_sets_hold_targets_and_specials_never_padding():
    ids, mask, _, positions, _, valid = toy_batch()
    importance = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=SPECIAL["pad"])
    importance.importance[5:] = torch.linspace(0, 20, VOCAB - 5)  # make the choice depend on ids
    k = 10
    kept, kept_real = importance.select(ids, mask, positions, valid, k)
    assert kept.shape == (3, k)
    assert torch.equal(kept, kept.sort(dim=1).values), "kept positions must stay in original order"
    for row in range(3):
        chosen = set(kept[row].tolist())
        real = int(mask[row].sum())
        specials = {i for i in range(real) if int(ids[row, i]) in (1, 2, 3, 4)}
        forced = specials | set(positions[row][valid[row]].tolist())
        assert forced <= chosen, (row, forced - chosen)
        if real >= k:
            assert all(p < real for p in chosen), "padding kept while real tokens remained"
            assert kept_real[row].all()
        else:
            assert set(range(real)) <= chosen and int(kept_real[row].sum()) == real
        free = [p for p in range(real) if p not in forced]
        free_kept = [p for p in free if p in chosen]
        free_dropped = [p for p in free if p not in chosen]
        if free_kept and free_dropped:  # what fills the rest is the highest importance
            scores = importance.importance[ids[row]]
            assert min(scores[free_kept]) >= max(scores[free_dropped])


def test_importance_update_equals_hand_computed_ema():
    importance = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=SPECIAL["pad"], init=10.0,
                                 beta=0.9)
    target_ids = torch.tensor([[7, 8, 7], [9, 7, 11]])
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    importance.update(target_ids, losses, valid, GroupInfo.trivial())
    expected = torch.full((VOCAB,), 10.0)
    expected[7] = 0.9 * 10 + 0.1 * (1 + 3 + 5) / 3  # duplicates averaged
    expected[8] = 0.9 * 10 + 0.1 * 2
    expected[9] = 0.9 * 10 + 0.1 * 4  # id 11 was invalid: untouched
    expected[[1, 2, 3, 4]] = PINNED_HIGH
    expected[0] = PINNED_LOW
    assert torch.allclose(importance.importance, expected, atol=1e-6)
    importance.update(target_ids[:1, :1], losses[:1, :1], valid[:1, :1], GroupInfo.trivial())
    assert abs(importance.importance[7].item() - (0.9 * expected[7].item() + 0.1 * 1.0)) < 1e-5


def test_importance_is_saved_and_restored_with_the_state_dict():
    model = BertForPreTraining(tiny("token_drop"), special_ids=SPECIAL)
    batch = toy_batch()
    out = model(*batch)
    model.update_importance(batch[4], out.target_losses, batch[5])
    state = model.state_dict()
    assert "bert.token_importance.importance" in state
    restored = BertForPreTraining(tiny("token_drop"), special_ids=SPECIAL)
    assert not torch.equal(restored.bert.token_importance.importance, state["bert.token_importance.importance"])
    restored.load_state_dict(state)
    assert torch.equal(restored.bert.token_importance.importance, state["bert.token_importance.importance"])


def _dp_update(rank: int, world_size: int) -> list[float]:
    from megatron_narrow.config import ParallelConfig
    from megatron_narrow.parallel import ProcessGroups

    groups = ProcessGroups.from_world(ParallelConfig(tensor_parallel=1))
    importance = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=0, beta=0.9)
    target_ids, losses, valid = _dp_shards()[0][rank]
    importance.update(target_ids, losses, valid, groups.data)
    return importance.importance.tolist()


def _dp_shards():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 40, (4, 6), generator=g)  # few ids: many duplicates across ranks
    losses = torch.rand(4, 6, generator=g) * 8
    valid = torch.rand(4, 6, generator=g) > 0.2
    return [(ids[:2], losses[:2], valid[:2]), (ids[2:], losses[2:], valid[2:])], (ids, losses, valid)


def test_two_data_parallel_ranks_end_with_identical_vectors_equal_to_one_process():
    ranks = run_distributed(_dp_update, 2)
    assert ranks[0] == ranks[1]
    single = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=0, beta=0.9)
    single.update(*_dp_shards()[1], GroupInfo.trivial())
    assert torch.allclose(torch.tensor(ranks[0]), single.importance, atol=1e-6)
    assert (single.importance != 10.0).sum() > len(SPECIAL) + 5
