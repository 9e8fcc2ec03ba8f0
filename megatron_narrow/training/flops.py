"""Estimated model FLOPs per training step, for the MFU column of the console line."""

from __future__ import annotations

from megatron_narrow.config import ModelConfig


def _layer_flops(queries: int, keys: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of one layer per sequence: Q/O and FFN on the query rows, K/V on the key rows."""
    projections = 2 * queries * hidden * hidden * 2 + 2 * keys * hidden * hidden * 2
    attention = 2 * 2 * queries * keys * hidden
    return projections + attention + 2 * 2 * queries * hidden * ffn


def training_flops_per_sequence(config: ModelConfig, seq_len: int, targets: int) -> int:
    """3x the forward FLOPs (backward is twice the forward) of one sequence, by variant."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    if config.variant == "narrow":
        full = config.full_length_layers
        layers = full * _layer_flops(seq_len, seq_len, h, f) + (n - full) * _layer_flops(targets, seq_len, h, f)
    elif config.variant == "token_drop":
        k = config.kept_tokens(seq_len)
        middle = max(0, n - 2 - (n // 2 - 1))
        layers = ((n // 2 - 1) + 1) * _layer_flops(seq_len, seq_len, h, f) + _layer_flops(k, seq_len, h, f) \
            + middle * _layer_flops(k, k, h, f)
    else:
        layers = n * _layer_flops(seq_len, seq_len, h, f)
    head = 2 * targets * h * (h + config.vocab_size)
    return 3 * (layers + head)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
