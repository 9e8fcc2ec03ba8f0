"""Masked-language-model corruption of one sample, vectorized with numpy.

The data pipeline must mask thousands of 512-token samples per second in one process, so nothing here
loops over tokens in Python. The output has static shapes: exactly `config.max_predictions` (M) target
slots, sorted by position, with a validity mask for the unused slots (NarrowBERT's narrow positions
are this [M] index).

Rules, in the order they are applied:
- Candidates are the positions the caller allows (real tokens, no padding) minus any special token id;
  special tokens are never targets.
- Target count n = min(M, round_half_up(mask_prob * n_candidates)), with round_half_up(x) = floor(x + 0.5).
  A sample with few candidates can get n = 0 (e.g. 3 candidates at 0.15 -> floor(0.95) = 0); its
  target slots are then all invalid.
- Plain masking picks n candidates uniformly without replacement.
- Whole-word masking visits the candidate words in random order and adds a word whenever all of its
  pieces still fit in n (Google BERT's rule), so the count can fall short of n: only under WWM.
- Each target independently becomes [MASK] with probability mask_token_prob, a uniformly random
  non-special token with probability random_token_prob, or stays unchanged.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from megatron_narrow.config import DataConfig
from megatron_narrow.data.tokenizer import SpecialTokens


def round_half_up(x: float) -> int:
    """floor(x + 0.5): halves round up (Python's round() would round 4.5 to 4)."""
    return int(np.floor(x + 0.5))


def num_targets(n_candidates: int, config: DataConfig) -> int:
    """The exact target count of plain masking for a sample with `n_candidates` maskable tokens."""
    return min(config.max_predictions, round_half_up(config.mask_prob * n_candidates))


@lru_cache(maxsize=64)
def _sorted_special_ids(special: SpecialTokens, vocab_size: int) -> np.ndarray:
    """Unique special ids inside the vocabulary, ascending (the order the random-id shift needs)."""
    ids = np.unique(np.asarray(special.ids(), dtype=np.int64))
    return ids[(ids >= 0) & (ids < vocab_size)]


def random_non_special_ids(
    rng: np.random.Generator, size: int, *, vocab_size: int, special: SpecialTokens
) -> np.ndarray:
    """int64[size]: ids uniform over [0, vocab_size) minus the special ids, without rejection sampling.

    Draw r uniform in [0, vocab_size - n_special) and step it over each special id in ascending order;
    this maps the range one-to-one onto the non-special ids.
    """
    specials = _sorted_special_ids(special, vocab_size)
    if vocab_size - specials.size <= 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to draw")
    ids = rng.integers(0, vocab_size - specials.size, size=size, dtype=np.int64)
    for s in specials:  # at most 5 steps, each vectorized over the targets
        ids += ids >= s
    return ids


def _whole_word_targets(
    positions: np.ndarray, token_ids: np.ndarray, word_start: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Candidate positions of whole words picked by Google BERT's rule, ascending.

    `positions` are the candidate positions (ascending) and `token_ids` their tokens. A word starts at a
    word-start token or wherever the candidates are not contiguous (a continuation piece after [CLS],
    [SEP] or at the start of a sequence is its own word).
    """
    starts = word_start[token_ids]
    starts[0] = True
    starts[1:] |= np.diff(positions) != 1
    word_of = np.cumsum(starts) - 1  # word id of each candidate
    lengths = np.bincount(word_of)
    order = rng.permutation(lengths.size)
    lens = lengths[order]
    picked = []
    budget = n
    # Sequential rule: scan words in random order, take a word if it fits. Each round takes the longest
    # prefix that fits (cumsum is monotone), then drops every word longer than the remaining budget,
    # which can never fit again; the next round's first word therefore fits. Few rounds in practice.
    while budget > 0:
        fits = lens <= budget
        order, lens = order[fits], lens[fits]
        if lens.size == 0:
            break
        cum = np.cumsum(lens)
        k = int(np.searchsorted(cum, budget, side="right"))
        picked.append(order[:k])
        budget -= int(cum[k - 1])
        order, lens = order[k:], lens[k:]
    if not picked:
        return positions[:0]
    chosen_words = np.zeros(lengths.size, dtype=bool)
    chosen_words[np.concatenate(picked)] = True
    return positions[chosen_words[word_of]]


def mask_tokens(
    input_ids: np.ndarray,
    *,
    candidate_mask: np.ndarray,
    config: DataConfig,
    rng: np.random.Generator,
    vocab_size: int,
    special: SpecialTokens,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Corrupt one sample for MLM.

    Args:
        input_ids: int[S], the sample with [CLS]/[SEP]/padding in place.
        candidate_mask: bool[S], positions that may become targets (real tokens, not padding).
        config: masking rates, max_predictions and whole_word_masking.
        rng: the sample's own generator (the caller makes it a pure function of the sample index).
        vocab_size: random replacements are drawn from [0, vocab_size) minus special ids.
        special: special token ids; they are never targets and never drawn as replacements.
        word_start: bool[vocab_size], True where a token starts a word; required for whole-word masking.

    Returns:
        (masked_input_ids int64[S], target_positions int64[M], target_ids int64[M], target_valid bool[M]):
        targets sorted by position; unused slots hold position 0, id special.pad and valid False.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    candidate_mask = np.asarray(candidate_mask, dtype=bool)
    if input_ids.ndim != 1 or candidate_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids must be 1-D and candidate_mask of the same shape, got {input_ids.shape} and "
            f"{candidate_mask.shape}"
        )
    m = config.max_predictions
    specials = _sorted_special_ids(special, vocab_size)
    # Special ids are never targets, whatever the caller allowed.
    allowed = candidate_mask & ~np.isin(input_ids, specials)
    positions = np.flatnonzero(allowed)
    n = min(m, round_half_up(config.mask_prob * positions.size))

    if n == 0:
        targets = positions[:0]
    elif config.whole_word_masking:
        if word_start is None:
            raise ValueError("data.whole_word_masking is set but no word_start mask was given")
        targets = _whole_word_targets(positions, input_ids[positions], word_start, n, rng)
    else:
        chosen = rng.choice(positions.size, size=n, replace=False, shuffle=False)
        targets = np.sort(positions[chosen])

    n_targets = targets.size
    original = input_ids[targets]
    masked = input_ids.copy()
    # One uniform draw per target decides [MASK] / random / keep.
    u = rng.random(n_targets)
    to_mask = u < config.mask_token_prob
    to_random = ~to_mask & (u < config.mask_token_prob + config.random_token_prob)
    masked[targets[to_mask]] = special.mask
    n_random = int(to_random.sum())
    if n_random:
        masked[targets[to_random]] = random_non_special_ids(rng, n_random, vocab_size=vocab_size, special=special)

    target_positions = np.zeros(m, dtype=np.int64)
    target_ids = np.full(m, special.pad, dtype=np.int64)
    target_valid = np.zeros(m, dtype=bool)
    target_positions[:n_targets] = targets
    target_ids[:n_targets] = original
    target_valid[:n_targets] = True
    return masked, target_positions, target_ids, target_valid
