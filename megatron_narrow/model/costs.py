"""Forward FLOPs of each transformer layer of a variant: what MFU estimates and cost-aware pipeline
partitioning weigh layers by (a narrow layer costs a fraction of a full one)."""

from __future__ import annotations

from megatron_narrow.config import ModelConfig
from megatron_narrow.variants import layer_roles


def layer_flops(queries: int, keys: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of one layer for one sequence: Q/O and FFN on the query rows, K/V on the key rows,
    attention scores and mixing for queries x keys."""
    projections = 2 * queries * hidden * hidden * 2 + 2 * keys * hidden * hidden * 2
    attention = 2 * 2 * queries * keys * hidden
    return projections + attention + 2 * 2 * queries * hidden * ffn


def layer_costs(config: ModelConfig, seq_len: int, num_queries: int) -> list[int]:
    """Forward FLOPs per sequence of each of the config's layers, in order, by its role (variants.py)."""
    h, f = config.hidden_size, config.intermediate_size
    k = config.kept_tokens(seq_len)
    rows = {"full": (seq_len, seq_len), "rejoin": (seq_len, seq_len), "narrow": (num_queries, seq_len),
            "transition": (k, seq_len), "kept": (k, k)}  # (query rows, key rows)
    return [layer_flops(*rows[role], h, f) for role in layer_roles(config)]


def head_flops(config: ModelConfig, num_targets: int) -> int:
    """Forward FLOPs per sequence of the sparse MLM head (transform + tied decoder on the target rows)."""
    return 2 * num_targets * config.hidden_size * (config.hidden_size + config.vocab_size)


def pipeline_layer_costs(config: ModelConfig, seq_len: int, num_queries: int) -> list[float]:
    """What pipeline partitioning weighs: each layer's forward FLOPs, the MLM head's added to the last layer's
    (the head always shares the last stage)."""
    costs = [float(c) for c in layer_costs(config, seq_len, num_queries)]
    costs[-1] += head_flops(config, num_queries)
    return costs

