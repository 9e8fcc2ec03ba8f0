"""Estimated model FLOPs per training step, for the MFU column of the console line."""

from __future__ import annotations

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.costs import head_flops, layer_costs


def training_flops_per_sequence(config: ModelConfig, seq_len: int, targets: int) -> int:
    """3x the forward FLOPs (backward is twice the forward) of one sequence, by variant."""
    return 3 * (sum(layer_costs(config, seq_len, targets)) + head_flops(config, targets))


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
