"""Splitting a stack of layers into pipeline stages: by layer count, or by cost.

Boundaries are a list [0, b1, ..., n] (DeepSpeed's `parts`): stage s runs items parts[s]..parts[s+1]-1.
Equal layer counts leave NarrowBERT's stages idle (a narrow layer costs a fraction of a full one), so
the cost-aware split minimises the most expensive stage instead.
"""

from __future__ import annotations

from collections.abc import Sequence


def uniform_partition(num_items: int, num_stages: int) -> list[int]:
    """Equal item counts per stage (the earlier stages take the remainder)."""
    _check(num_items, num_stages)
    base, extra = divmod(num_items, num_stages)
    parts = [0]
    for stage in range(num_stages):
        parts.append(parts[-1] + base + (stage < extra))
    return parts


def balanced_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous stages minimising the largest stage cost (every stage gets at least one item).

    Exact dynamic programme over prefix sums, O(stages x items^2): fine for the few hundred items of a
    pipeline (embeddings, layers, head)."""
    n = len(costs)
    _check(n, num_stages)
    prefix = [0.0]
    for cost in costs:
        if cost < 0:
            raise ValueError(f"layer costs must be non-negative, got {cost}")
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: the smallest possible max stage cost of putting items[:i] into s stages; cut[s][i] its last cut
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    parts = [n]
    for s in range(num_stages, 0, -1):
        parts.append(cut[s][parts[-1]])
    return parts[::-1]


def stage_costs(costs: Sequence[float], parts: Sequence[int]) -> list[float]:
    return [sum(costs[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1)]


def imbalance(costs: Sequence[float], parts: Sequence[int]) -> float:
    """Most over least expensive stage (1.0 is perfect balance)."""
    per_stage = stage_costs(costs, parts)
    return max(per_stage) / min(per_stage) if min(per_stage) > 0 else float("inf")


def _check(num_items: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"need at least one pipeline stage, got {num_stages}")
    if num_items < num_stages:
        raise ValueError(f"cannot split {num_items} layers into {num_stages} pipeline stages")
