"""Token dropping: keep-all equals BERT, kept sets, the importance EMA, state dict, data-parallel sync."""

from __future__ import annotations

import pytest
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


def _hf_layer(layer, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One transformers BertLayer over (B, S, H) with a (B, S) key mask (eager attention, additive mask)."""
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    out = layer(hidden, attention_mask=additive)
    return out[0] if isinstance(out, tuple) else out


def test_token_drop_forward_equals_its_definition_in_transformers_layers():
    """The schedule rebuilt from stock transformers BertLayers on the same weights: layers 0..L/2-2 on all
    tokens; the transition layer's outputs at the kept tokens (a query's output depends only on its own row
    and all keys, so that is the full layer at those rows); the middle layers on the kept tokens alone; the
    dropped tokens' transition inputs scattered back before the last layer. Logits at the targets agree to
    fp32 rounding. The kept set is the model's own (test_kept_sets_* checks how it is chosen)."""
    from transformers import BertConfig, BertForMaskedLM

    from megatron_narrow.formats.hf_bert import load_hf_state_dict

    config = tiny("token_drop", token_drop_keep_ratio=0.5)
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                    intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    attn_implementation="eager")).eval()
    ours = BertForPreTraining(config, special_ids=SPECIAL).eval()
    load_hf_state_dict(ours, hf.state_dict())
    ours.bert.token_importance.importance[5:] = torch.linspace(0, 20, VOCAB - 5)  # a choice that depends on ids
    ids, mask, types, positions, target_ids, valid = toy_batch()
    seq = ids.shape[1]
    kept, kept_real = ours.bert.token_importance.select(ids, mask, positions, valid, config.kept_tokens(seq))
    assert 0 < kept.shape[1] < seq

    layers = hf.bert.encoder.layer
    with torch.no_grad():
        ours_logits = ours(ids, mask, types, positions, target_ids, valid).logits[..., :VOCAB]
        hidden = hf.bert.embeddings(input_ids=ids, token_type_ids=types)
        for index in (0, 1):
            hidden = _hf_layer(layers[index], hidden, mask)
        waiting = hidden
        rows = kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        hidden = _hf_layer(layers[2], hidden, mask).gather(1, rows)
        for index in (3, 4):
            hidden = _hf_layer(layers[index], hidden, kept_real)
        hidden = _hf_layer(layers[5], waiting.scatter(1, rows, hidden), mask)
        reference = hf.cls(hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))
    torch.testing.assert_close(ours_logits, reference, atol=1e-5, rtol=0)
    bert = BertForPreTraining(tiny("bert"), special_ids=SPECIAL).eval()
    load_hf_state_dict(bert, hf.state_dict())
    with torch.no_grad():  # and dropping matters here: plain BERT on the same weights is not it
        gap = (bert(ids, mask, types, positions, target_ids, valid).logits[..., :VOCAB] - reference).abs().max()
    assert gap > 1e-4, gap  # 10x the tolerance of the equality above


@pytest.mark.parametrize("force_targets", [False, True])
def test_kept_sets_hold_specials_never_padding(force_targets):
    """special (default, the official rule): only tokens whose input id is special are forced, so targets
    shown unmasked (the 10% random / 10% unchanged) compete on importance; targets: every target is kept."""
    ids, mask, _, positions, _, valid = toy_batch()
    importance = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=SPECIAL["pad"],
                                 force_targets=force_targets)
    importance.importance[5:] = torch.linspace(0, 20, VOCAB - 5)  # make the choice depend on ids
    k = 10
    kept, kept_real = importance.select(ids, mask, positions, valid, k)
    assert kept.shape == (3, k)
    assert torch.equal(kept, kept.sort(dim=1).values), "kept positions must stay in original order"
    ranked_rows, unmasked_targets_dropped = 0, 0
    for row in range(3):
        chosen = set(kept[row].tolist())
        real = int(mask[row].sum())
        specials = {i for i in range(real) if int(ids[row, i]) in (1, 2, 3, 4)}
        targets = set(positions[row][valid[row]].tolist())
        forced = specials | targets if force_targets else specials
        assert forced <= chosen, (row, forced - chosen)
        unmasked_targets_dropped += len(targets - specials - chosen)
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
            ranked_rows += 1
    assert ranked_rows >= 1, "no row chose between free tokens: the ranking went untested"
    assert (unmasked_targets_dropped == 0) == force_targets, unmasked_targets_dropped


def test_ties_keep_the_earliest_positions():
    """Hand-made rows where every free token ties (a fresh vector; repeated ids): the earliest positions win,
    as tf.math.top_k's order does in the official code."""
    cls, sep, mask_id, pad = SPECIAL["cls"], SPECIAL["sep"], SPECIAL["mask"], SPECIAL["pad"]
    ids = torch.tensor([[cls, 50, 51, 52, 53, 54, 55, sep],
                        [cls, 9, 9, 9, mask_id, 9, 9, sep],
                        [cls, 70, 70, sep, pad, pad, pad, pad]])
    mask = (ids != pad).long()
    importance = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=pad)
    kept, kept_real = importance.select(ids, mask, None, None, 5)
    assert kept.tolist() == [[0, 1, 2, 3, 7], [0, 1, 2, 4, 7], [0, 1, 2, 3, 4]]
    assert kept_real.tolist() == [[True] * 5, [True] * 5, [True, True, True, True, False]]
    importance.importance[52] = 11.0  # one id above the tie: it displaces the latest of the tied
    kept, _ = importance.select(ids, mask, None, None, 5)
    assert kept[0].tolist() == [0, 1, 2, 3, 7]
    importance.importance[55] = 12.0
    kept, _ = importance.select(ids, mask, None, None, 5)
    assert kept[0].tolist() == [0, 1, 3, 6, 7]


def test_importance_stays_float32_and_updates_as_in_fp32_under_bf16():
    """A bf16 model keeps a float32 vector, so its running average moves exactly as the fp32 model's; in bf16
    arithmetic the same average would stall (10.0 -> 4.0 by 0.5% a step stops at 8.0)."""
    model = BertForPreTraining(tiny("token_drop"), special_ids=SPECIAL).bfloat16()
    assert model.bert.token_importance.importance.dtype == torch.float32
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    fp32 = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=0, beta=0.995)
    bf16 = TokenImportance(VOCAB, special_ids=tuple(SPECIAL.values()), pad_id=0, beta=0.995).bfloat16()
    ids, losses, valid = torch.tensor([[7, 8]]), torch.tensor([[4.0, 4.0]]), torch.ones(1, 2, dtype=torch.bool)
    for _ in range(400):
        fp32.update(ids, losses, valid, GroupInfo.trivial())
        bf16.update(ids, losses.bfloat16(), valid, GroupInfo.trivial())
    assert torch.equal(bf16.importance, fp32.importance)
    assert fp32.importance[7].item() < 4.0 + 6.0 * 0.995 ** 400 + 1e-4  # it reached ~4.8, past 8.0
    stalled = torch.tensor(10.0, dtype=torch.bfloat16)
    for _ in range(400):
        stalled = 0.995 * stalled + 0.005 * 4.0
    assert stalled.item() == 8.0  # what the guard prevents


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


def test_update_and_kept_set_follow_the_tf_model_garden_rule():
    """The rule of TensorFlow Model Garden's token_dropping project (official/projects/token_dropping: encoder.py
    with nlp/modeling/layers/routing.py's TokenImportanceWithMovingAvg and SelectTopK), worked by hand on a toy
    batch: vocabulary [PAD] [CLS] [SEP] [MASK] and words 4-7, init 10, beta 0.5; each target's id moves to
    beta * imp + (1 - beta) * loss; the kept set is the top k by the importance of each position's INPUT id
    (a [MASK] position counts as [MASK], pinned high), ties to the earliest position.

    Where the rules differ, ours is asserted with its reason: an id that is a target twice moves by the mean of
    its losses (theirs scatters one copy's update, which copy being unspecified on accelerators); padded
    prediction slots and [PAD] never move (theirs lets [PAD] drift up from -1e4 with the zero-padded slots)."""
    importance = TokenImportance(8, special_ids=(0, 1, 2, 3), pad_id=0, init=10.0, beta=0.5)
    input_ids = torch.tensor([[1, 4, 3, 5, 2, 0], [1, 6, 7, 3, 4, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    target_ids = torch.tensor([[6, 5, 0], [6, 7, 0]])  # row 0: [MASK] at 2 hides 6, 5 unchanged at 3
    losses = torch.tensor([[4.0, 1.0, 12.0], [2.0, 2.5, 14.0]])  # the third slot is padding
    valid = torch.tensor([[True, True, False], [True, True, False]])
    importance.update(target_ids, losses, valid, GroupInfo.trivial())
    expected = torch.tensor([PINNED_LOW, PINNED_HIGH, PINNED_HIGH, PINNED_HIGH,
                             10.0,  # not a target: unchanged (theirs too)
                             0.5 * 10 + 0.5 * 1.0,  # 5.5 (theirs too)
                             0.5 * 10 + 0.5 * (4.0 + 2.0) / 2,  # 6.5: the mean (theirs: 6.0 or 7.0)
                             0.5 * 10 + 0.5 * 2.5])  # 6.25 (theirs too)
    assert torch.equal(importance.importance, expected)
    # k = 3 (keep ratio 0.5 of 6): [CLS], [MASK]/[SEP] forced by their pinned ids, then the best word; theirs
    # keeps the same sets: row 0 {0, 2, 4}, row 1 {0, 3, 5}
    kept, real = importance.select(input_ids, attention_mask, None, None, 3)
    assert kept.tolist() == [[0, 2, 4], [0, 3, 5]] and real.all()
    # k = 5: row 1 keeps id 6 (6.5) over id 7 (6.25) at position 1; theirs, with 6.0 for id 6, would drop it
    kept, real = importance.select(input_ids, attention_mask, None, None, 5)
    assert kept.tolist() == [[0, 1, 2, 3, 4], [0, 1, 3, 4, 5]] and real.all()
