"""Pipeline partitioning: cost-aware stages balance NarrowBERT where equal layer counts cannot."""

from __future__ import annotations

import itertools

import pytest

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.costs import layer_costs
from megatron_narrow.model.partition import balanced_partition, imbalance, stage_costs, uniform_partition


def brute_force_best(costs, stages):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        parts = [0, *cuts, n]
        best = min(best, max(stage_costs(costs, parts)))
    return best


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_balanced_partition_is_optimal(stages):
    costs = [5, 1, 1, 9, 2, 2, 2, 7, 1, 3]
    parts = balanced_partition(costs, stages)
    assert parts[0] == 0 and parts[-1] == len(costs) and len(parts) == stages + 1
    assert all(a < b for a, b in itertools.pairwise(parts))
    assert max(stage_costs(costs, parts)) == brute_force_best(costs, stages)


def test_uniform_partition_counts():
    assert uniform_partition(12, 2) == [0, 6, 12]
    assert uniform_partition(10, 4) == [0, 3, 6, 8, 10]
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 pipeline stages"):
        uniform_partition(3, 4)


def test_cost_aware_partition_balances_narrowbert():
    config = ModelConfig(hidden_size=768, num_heads=12, num_layers=12, variant="narrow", full_length_layers=2)
    costs = layer_costs(config, seq_len=512, num_queries=80)
    assert costs[2] < 0.3 * costs[0], "a narrow layer costs a fraction of a full one"
    uniform = uniform_partition(len(costs), 2)
    balanced = balanced_partition(costs, 2)
    assert imbalance(costs, uniform) > 1.8  # 2 full + 4 narrow layers against 6 narrow ones
    assert imbalance(costs, balanced) <= 1.2
    assert balanced[1] < 6, "the stage holding the full-length layers takes fewer layers"
