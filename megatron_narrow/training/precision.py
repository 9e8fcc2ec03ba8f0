"""`train.precision: auto`: bf16 where the hardware runs bf16 matrix products fast, fp32 elsewhere.

bf16 only pays where the matrix units take it natively: CUDA devices from Ampere on (tensor cores), and CPUs
with AMX or AVX512-BF16 (oneDNN's bf16 GEMMs: ~3x fp32 on a Sapphire Rapids core). Elsewhere torch emulates
bf16 products through a reference loop: on an AVX2-only CPU (an AMD EPYC here) a 2048 x 1024 x 1024 bf16
GEMM ran at 1 GFLOP/s against 160 in fp32, so `auto` must not pick bf16 there.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import torch

RunT = TypeVar("RunT")

PRECISIONS = ("fp32", "bf16", "fp16")
"""What train.precision resolves to; `auto` picks one of the first two."""


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether bf16 matrix products are native on `device`, the hardware fact that says so)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8 and torch.cuda.is_bf16_supported():
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores"
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return True, "this CPU has AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return True, "this CPU has AVX512-BF16"
        return False, "this CPU has neither AMX nor AVX512-BF16 (bf16 matrix products would be emulated)"
    return False, f"no bf16 detection for {device.type} devices"


def resolve_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """(the precision to train in, why): `auto` becomes bf16 or fp32 by `fast_bf16`; others stay as set."""
    if setting != "auto":
        return setting, "train.precision"
    fast, reason = fast_bf16(device)
    return ("bf16" if fast else "fp32"), f"train.precision=auto: {reason}"


def with_resolved_precision(run: RunT, device: torch.device) -> tuple[RunT, str]:
    """(a copy of a run config, pretraining's or fine-tuning's, whose train.precision is concrete; the line the
    run prints first, saying which precision and why)."""
    precision, why = resolve_precision(run.train.precision, device)
    return replace(run, train=replace(run.train, precision=precision)), f"precision {precision} ({why})"
