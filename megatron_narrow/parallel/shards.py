"""Splitting, merging and re-padding tensor-parallel shards: the one place that slices a full tensor into this
rank's piece or puts the pieces back, for training (a vocabulary-parallel bias), conversion to and from Hugging
Face, and the re-padding of a universal checkpoint for another TP size.

A split parameter declares its dimension (`tensor_parallel_dim`, set by `mark_tensor_parallel`), so no table
of names is kept here. Vocabulary-parallel tensors are padded to `padded_vocab_size` rows first; the padding
rows are zero and never chosen (their logits are -inf).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_narrow.parallel.groups import GroupInfo


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    """Tag a split parameter: `tensor_parallel_dim` for our converters, `tensor_model_parallel` for
    DeepSpeed's gradient-norm code (which counts replicated parameters on TP rank 0 only)."""
    param.tensor_parallel_dim = dim  # type: ignore[attr-defined]
    param.tensor_model_parallel = True  # type: ignore[attr-defined]


def tensor_parallel_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dimension it is split along under tensor parallelism."""
    return {name: p.tensor_parallel_dim for name, p in model.named_parameters() if hasattr(p, "tensor_parallel_dim")}


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Vocabulary rounded up to a multiple of `multiple * tensor_parallel` (even shards, aligned GEMMs)."""
    step = multiple * tensor_parallel
    return -(-vocab_size // step) * step


def vocab_shard(vocab_size: int, group: GroupInfo, padded_size: int | None = None) -> tuple[int, int, int]:
    """(first row, end row, padded vocabulary) of this rank's shard of a vocabulary-parallel table."""
    padded = padded_size or padded_vocab_size(vocab_size, group.size)
    if padded < vocab_size:
        raise ValueError(f"padded vocabulary {padded} is smaller than the vocabulary {vocab_size}")
    local = divide(padded, group.size, "padded vocabulary size")
    return group.rank * local, (group.rank + 1) * local, padded


def vocab_padding_bias(vocab_size: int, group: GroupInfo) -> torch.Tensor | None:
    """-inf on this rank's padding columns of a vocabulary-parallel output, 0 on real ones; None when the shard
    has no padding. Added to a logit bias so that the zero padding rows of the table take no softmax share."""
    start, end, _ = vocab_shard(vocab_size, group)
    first_padding_column = min(max(vocab_size - start, 0), end - start)
    if first_padding_column == end - start:
        return None
    padding = torch.zeros(end - start)
    padding[first_padding_column:] = float("-inf")
    return padding


def refit_vocab_rows(value: torch.Tensor, vocab_size: int, rows: int) -> torch.Tensor:
    """Rows padded for one TP size (or none) -> `rows` (another TP size's padding): real rows kept, padding
    zeroed."""
    value = value[:vocab_size]
    return torch.cat([value, value.new_zeros((rows - vocab_size, *value.shape[1:]))])


def split_for_rank(full: torch.Tensor, dim: int, group_size: int, rank: int) -> torch.Tensor:
    """This rank's piece of a full tensor split along `dim`."""
    return full.chunk(group_size, dim=dim)[rank]


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """One full state dict from the state dicts of all TP ranks (rank order); replicated tensors from rank 0."""
    merged = {}
    for key, value in shards[0].items():
        merged[key] = torch.cat([s[key] for s in shards], dim=dims[key]) if key in dims else value
    return merged
