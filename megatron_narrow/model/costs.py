"""Forward FLOPs of each transformer layer of a variant: what MFU estimates and cost-aware pipeline
partitioning weigh layers by (a narrow layer costs a fraction of a full one)."""

from __future__ import annotations

from megatron_narrow.config import ModelConfig


def layer_flops(queries: int, keys: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of one layer for one sequence: Q/O and FFN on the query rows, K/V on the key rows,
    attention scores and mixing for queries x keys."""
    projections = 2 * queries * hidden * hidden * 2 + 2 * keys * hidden * hidden * 2
    attention = 2 * 2 * queries * keys * hidden
    return projections + attention + 2 * 2 * queries * hidden * ffn


def layer_costs(config: ModelConfig, seq_len: int, num_queries: int) -> list[int]:
    """Forward FLOPs per sequence of each of the config's layers, in order, for its variant."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    full = layer_flops(seq_len, seq_len, h, f)
    if config.variant == "narrow":
        narrow = layer_flops(num_queries, seq_len, h, f)
        return [full if i < config.full_length_layers else narrow for i in range(n)]
    if config.variant == "token_drop":
        k = config.kept_tokens(seq_len)
        transition = n // 2 - 1
        costs = []
        for i in range(n):
            if i < transition or i == n - 1:
                costs.append(full)
            elif i == transition:
                costs.append(layer_flops(k, seq_len, h, f))
            else:
                costs.append(layer_flops(k, k, h, f))
        return costs
    return [full] * n


def head_flops(config: ModelConfig, num_targets: int) -> int:
    """Forward FLOPs per sequence of the sparse MLM head (transform + tied decoder on the target rows)."""
    return 2 * num_targets * config.hidden_size * (config.hidden_size + config.vocab_size)


def pipeline_layer_costs(config: ModelConfig, seq_len: int, num_queries: int) -> list[float]:
    """What pipeline partitioning weighs: each layer's forward FLOPs, the MLM head's added to the last layer's
    (the head always shares the last stage)."""
    costs = [float(c) for c in layer_costs(config, seq_len, num_queries)]
    costs[-1] += head_flops(config, num_queries)
    return costs

