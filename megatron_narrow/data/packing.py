"""Packing ordinary samples into full rows, and the worst-case target count of a packed row.

Why a histogram packer: next-fit over shuffled samples leaves about half a sample empty per row (~6% of a
512-token row for 60-token documents), and first-fit-decreasing over individual samples is a Python loop per
document. Samples of equal cost are interchangeable for packing, so first-fit-decreasing runs on the length
histogram instead (Krell et al. 2021, "Efficient sequence packing without cross-contamination"): its work
grows with the number of distinct lengths (<= seq_len) and row layouts, not with the number of documents.
The samples themselves are then dealt to the layouts with numpy, in a seeded order, so which samples share a
row is a pure function of (seed, name) and every sample lands in exactly one row.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def _pack_histogram(hist: np.ndarray, capacity: int, max_segments: int | None) -> Counter:
    """First-fit-decreasing (best fit for each cost) on a histogram: {layout (tuple of costs): row count}.

    `hist[c]` samples cost c slots. Largest costs first; each goes to an open layout with the least room that
    still fits it (and has fewer than max_segments samples); when none fits, new rows are opened, each
    holding as many samples of this cost as fit (best fit would put them there next anyway)."""
    limit = max_segments or capacity
    layouts: Counter = Counter()
    for cost in range(len(hist) - 1, 0, -1):
        n = int(hist[cost])
        while n:
            fitting = [(capacity - sum(lay), lay) for lay in layouts
                       if capacity - sum(lay) >= cost and len(lay) < limit]
            if not fitting:
                per_row = min(capacity // cost, limit)
                full, rest = divmod(n, per_row)
                if full:
                    layouts[(cost,) * per_row] += full
                if rest:
                    layouts[(cost,) * rest] += 1
                break
            _, layout = min(fitting)
            moved = min(n, layouts[layout])
            layouts[layout] -= moved
            if not layouts[layout]:
                del layouts[layout]
            layouts[(*layout, cost)] += moved
            n -= moved
    return layouts


def pack_samples(costs: np.ndarray, capacity: int, rng: np.random.Generator,
                 max_segments: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of samples whose costs sum to at most `capacity`.

    Returns (members int64[N], row_starts int64[R + 1]): row r holds samples members[row_starts[r]:
    row_starts[r + 1]], largest first. Every sample appears exactly once; `rng` decides which samples of
    equal cost go together."""
    costs = np.asarray(costs, dtype=np.int64)
    if costs.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    if costs.min() < 1 or costs.max() > capacity:
        raise ValueError(f"sample costs must lie in [1, {capacity}], got [{costs.min()}, {costs.max()}]")
    layouts = _pack_histogram(np.bincount(costs, minlength=capacity + 1), capacity, max_segments)
    # Rows in a fixed order (layouts sorted), each row's slots in order; slot k of the flat list wants a cost.
    layout_list = sorted(layouts.items())
    row_lengths = np.concatenate([np.full(count, len(lay), dtype=np.int64) for lay, count in layout_list])
    slot_costs = np.concatenate([np.tile(np.asarray(lay, dtype=np.int64), count) for lay, count in layout_list])
    # Deal the samples of each cost, in a seeded order, to the slots wanting that cost, in slot order.
    shuffled = rng.permutation(costs.size)
    by_cost = shuffled[np.argsort(costs[shuffled], kind="stable")]
    slot_order = np.argsort(slot_costs, kind="stable")
    members = np.empty(costs.size, dtype=np.int64)
    members[slot_order] = by_cost
    row_starts = np.concatenate([[0], np.cumsum(row_lengths)])
    return members, row_starts


def max_packed_targets(seq_len: int, mask_prob: float, overhead: int = 2) -> int:
    """The most MLM targets a packed row of `seq_len` slots can need when each segment of c tokens costs
    c + overhead slots and gets round_half_up(mask_prob * c) targets (data/masking.py's count). Short segments
    round up more often than long ones, so the worst row is not 15% of seq_len (at 512: 86, not 77)."""
    best = np.zeros(seq_len + 1, dtype=np.int64)
    lengths = np.arange(1, seq_len + 1, dtype=np.int64)
    targets = np.floor(mask_prob * lengths + 0.5).astype(np.int64)
    for slots in range(overhead + 1, seq_len + 1):
        usable = lengths <= slots - overhead
        best[slots] = max(best[slots - 1], int((best[slots - overhead - lengths[usable]] + targets[usable]).max()))
    return int(best[seq_len])
