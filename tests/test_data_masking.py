"""MLM masking: exact target counts, 80/10/10 rates, specials never touched, whole words only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_narrow.config import DataConfig
from megatron_narrow.data.masking import mask_tokens, num_targets, random_non_special_ids, round_half_up
from megatron_narrow.data.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
VOCAB = 1000


def _sample(rng: np.random.Generator, seq_len: int, n_real: int) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] n_real random ordinary tokens [SEP] [PAD]...; candidates = the ordinary tokens."""
    ids = np.full(seq_len, SPECIAL.pad, dtype=np.int64)
    ids[0] = SPECIAL.cls
    ids[1 : 1 + n_real] = rng.integers(5, VOCAB, n_real)
    ids[1 + n_real] = SPECIAL.sep
    candidates = np.zeros(seq_len, dtype=bool)
    candidates[1 : 1 + n_real] = True
    return ids, candidates


def test_round_half_up_and_target_count_formula():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 4.5, 0.49, 7.2)] == [1, 2, 3, 5, 0, 7]
    config = DataConfig(seq_len=512, max_predictions=20)
    # 0.15 * n: 3 -> 0.45 -> 0; 10 -> 1.5 -> 2; 30 -> 4.5 -> 5; 130 -> 19.5 -> 20; 200 -> 30 capped at 20.
    assert [num_targets(n, config) for n in (0, 3, 4, 10, 30, 130, 200)] == [0, 0, 1, 2, 5, 20, 20]


def test_exact_target_count_sorted_and_padded():
    config = DataConfig(seq_len=128, max_predictions=12, seed=1)
    rng = np.random.default_rng(0)
    for n_real in list(range(0, 127)) * 3:
        ids, candidates = _sample(rng, 128, n_real)
        masked, pos, tid, valid = mask_tokens(
            ids, candidate_mask=candidates, config=config, rng=rng, vocab_size=VOCAB, special=SPECIAL
        )
        expected = min(12, math.floor(0.15 * n_real + 0.5))
        assert valid.sum() == expected
        assert np.all(valid[:expected])
        assert not np.any(valid[expected:])
        real = pos[:expected]
        assert np.all(np.diff(real) > 0), "targets sorted, without repeats"
        assert np.all(candidates[real])
        assert np.array_equal(tid[:expected], ids[real])
        # Unused slots: position 0, [PAD] id; untouched positions unchanged.
        assert np.all(pos[expected:] == 0)
        assert np.all(tid[expected:] == SPECIAL.pad)
        untouched = np.ones(128, dtype=bool)
        untouched[real] = False
        assert np.array_equal(masked[untouched], ids[untouched])
        assert masked.dtype == pos.dtype == tid.dtype == np.int64
        assert valid.dtype == bool
        assert pos.shape == tid.shape == valid.shape == (12,)


def test_targets_uniform_over_candidates():
    config = DataConfig(seq_len=64, max_predictions=10)
    rng = np.random.default_rng(1)
    ids, candidates = _sample(rng, 64, 40)  # 6 targets of 40 candidates
    hits = np.zeros(64)
    trials = 4000
    for _ in range(trials):
        _, pos, _, valid = mask_tokens(
            ids, candidate_mask=candidates, config=config, rng=rng, vocab_size=VOCAB, special=SPECIAL
        )
        hits[pos[valid]] += 1
    rate = hits[1:41] / trials
    assert np.all(np.abs(rate - 6 / 40) < 0.03), rate  # binomial sd ~0.0057
    assert hits[0] == 0
    assert hits[41:].sum() == 0


def test_80_10_10_proportions():
    config = DataConfig(seq_len=512, max_predictions=80)
    rng = np.random.default_rng(2)
    counts = {"mask": 0, "random": 0, "keep": 0}
    while sum(counts.values()) < 30_000:
        ids, candidates = _sample(rng, 512, int(rng.integers(100, 511)))
        masked, pos, tid, valid = mask_tokens(
            ids, candidate_mask=candidates, config=config, rng=rng, vocab_size=VOCAB, special=SPECIAL
        )
        new = masked[pos[valid]]
        old = tid[valid]
        counts["mask"] += int(np.sum(new == SPECIAL.mask))
        # A random draw equal to the original (p = 1/995) counts as kept; 0.01 pp, far below the tolerance.
        counts["random"] += int(np.sum((new != SPECIAL.mask) & (new != old)))
        counts["keep"] += int(np.sum(new == old))
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.008  # ~4 standard deviations of 30k draws
    assert abs(counts["random"] / total - 0.1) < 0.008  # ~4 standard deviations of 30k draws
    assert abs(counts["keep"] / total - 0.1) < 0.008  # ~4 standard deviations of 30k draws


def test_special_tokens_never_targets():
    config = DataConfig(seq_len=64, max_predictions=64, mask_prob=0.9)
    rng = np.random.default_rng(3)
    for _ in range(300):
        ids = rng.integers(0, 20, 64)  # ids 0..4 are special: plenty of them in the middle
        candidates = rng.random(64) < 0.9
        masked, pos, tid, valid = mask_tokens(
            ids, candidate_mask=candidates, config=config, rng=rng, vocab_size=20, special=SPECIAL
        )
        allowed = candidates & (ids >= 5)
        assert valid.sum() == min(64, math.floor(0.9 * allowed.sum() + 0.5))
        assert np.all(allowed[pos[valid]])
        assert np.all(tid[valid] >= 5)
        # Specials and non-candidates keep their ids.
        keep = ~allowed
        assert np.array_equal(masked[keep], ids[keep])


@pytest.mark.parametrize("special", [SPECIAL, SpecialTokens(pad=0, unk=100, cls=101, sep=102, mask=103)])
def test_random_replacements_uniform_over_non_special(special):
    vocab = 110
    ids = random_non_special_ids(np.random.default_rng(4), 210_000, vocab_size=vocab, special=special)
    counts = np.bincount(ids, minlength=vocab)
    special_ids = list(special.ids())
    assert counts[special_ids].sum() == 0
    ordinary = np.delete(counts, special_ids)
    assert ordinary.size == 105
    assert np.all(np.abs(ordinary / 2000 - 1) < 0.1)


def test_random_replacement_in_mask_tokens_never_special():
    config = DataConfig(seq_len=64, max_predictions=64, mask_prob=0.5, mask_token_prob=0.0, random_token_prob=1.0)
    rng = np.random.default_rng(5)
    seen = np.zeros(8, dtype=np.int64)
    for _ in range(500):
        ids, candidates = _sample(rng, 64, 60)
        ids[1:61] = rng.integers(5, 8, 60)
        masked, pos, _, valid = mask_tokens(
            ids, candidate_mask=candidates, config=config, rng=rng, vocab_size=8, special=SPECIAL
        )
        seen += np.bincount(masked[pos[valid]], minlength=8)
    assert seen[:5].sum() == 0
    assert np.all(np.abs(seen[5:] / seen.sum() - 1 / 3) < 0.02)


# ----------------------------------------------------------------------------------- whole-word masking

WORD_START = np.zeros(VOCAB, dtype=bool)
WORD_START[5:500] = True  # 5..499 start a word, 500..999 continue one


def _words_sample(rng: np.random.Generator, seq_len: int, lead_continuations: int = 0):
    """[CLS] (continuations) words of 1-4 pieces [SEP] [PAD]..."""
    body = list(rng.integers(500, VOCAB, lead_continuations))
    while True:
        word = [int(rng.integers(5, 500)), *list(rng.integers(500, VOCAB, int(rng.integers(0, 4))))]
        if len(body) + len(word) > seq_len - 2 - int(rng.integers(0, 30)):
            break
        body += word
    ids, candidates = _sample(rng, seq_len, len(body))
    ids[1 : 1 + len(body)] = body
    return ids, candidates


def _word_spans(ids: np.ndarray, candidates: np.ndarray) -> list[tuple[int, int]]:
    """Reference word segmentation with a plain loop."""
    spans, start = [], None
    for p in range(len(ids)):
        if not candidates[p]:
            if start is not None:
                spans.append((start, p))
            start = None
        elif start is None or WORD_START[ids[p]]:
            if start is not None:
                spans.append((start, p))
            start = p
    if start is not None:
        spans.append((start, len(ids)))
    return spans


def test_whole_word_masking_matches_google_rule():
    config = DataConfig(seq_len=128, max_predictions=20, whole_word_masking=True)
    for seed in range(300):
        rng = np.random.default_rng(seed)
        ids, candidates = _words_sample(rng, 128, lead_continuations=seed % 3)
        _, pos, _, valid = mask_tokens(
            ids,
            candidate_mask=candidates,
            config=config,
            rng=np.random.default_rng([seed, 1]),
            vocab_size=VOCAB,
            special=SPECIAL,
            word_start=WORD_START,
        )
        # Reference: the same word order, then Google's sequential "add the word if it still fits".
        spans = _word_spans(ids, candidates)
        n = min(20, math.floor(0.15 * candidates.sum() + 0.5))
        order = np.random.default_rng([seed, 1]).permutation(len(spans))
        chosen = []
        for w in order:
            lo, hi = spans[w]
            if len(chosen) + hi - lo <= n:
                chosen += range(lo, hi)
        assert np.array_equal(pos[valid], np.sort(chosen))
        assert valid.sum() <= n
        # Whole words only: every picked word is complete.
        picked = set(pos[valid].tolist())
        for lo, hi in spans:
            assert len(picked & set(range(lo, hi))) in (0, hi - lo)


def test_whole_word_masking_single_piece_words_exact_count():
    config = DataConfig(seq_len=128, max_predictions=20, whole_word_masking=True)
    rng = np.random.default_rng(7)
    for n_real in range(0, 126):
        ids, candidates = _sample(rng, 128, n_real)
        ids[1 : 1 + n_real] = rng.integers(5, 500, n_real)  # every token starts its own word
        _, _, _, valid = mask_tokens(
            ids,
            candidate_mask=candidates,
            config=config,
            rng=rng,
            vocab_size=VOCAB,
            special=SPECIAL,
            word_start=WORD_START,
        )
        assert valid.sum() == min(20, math.floor(0.15 * n_real + 0.5))


def test_whole_word_masking_needs_word_start():
    config = DataConfig(seq_len=64, max_predictions=8, whole_word_masking=True)
    ids, candidates = _sample(np.random.default_rng(0), 64, 40)
    with pytest.raises(ValueError, match="word_start"):
        mask_tokens(
            ids,
            candidate_mask=candidates,
            config=config,
            rng=np.random.default_rng(0),
            vocab_size=VOCAB,
            special=SPECIAL,
        )


def test_same_rng_same_result():
    config = DataConfig(seq_len=128, max_predictions=20)
    ids, candidates = _sample(np.random.default_rng(0), 128, 100)
    a = mask_tokens(
        ids, candidate_mask=candidates, config=config, rng=np.random.default_rng(9), vocab_size=VOCAB, special=SPECIAL
    )
    b = mask_tokens(
        ids, candidate_mask=candidates, config=config, rng=np.random.default_rng(9), vocab_size=VOCAB, special=SPECIAL
    )
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
