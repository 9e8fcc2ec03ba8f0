"""Column- and row-parallel linear layers and a vocabulary-parallel embedding.

Initialisation draws the full master weight from the caller's generator and keeps this rank's slice,
so TP=1 and TP=N start from identical weights and tests can compare them; the generator advances by
the same amount whatever the TP size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from megatron_narrow.parallel.groups import GroupInfo
from megatron_narrow.parallel.mappings import (
    copy_to_tensor_region,
    gather_from_tensor_region,
    reduce_from_tensor_region,
    scatter_to_tensor_region,
)
from megatron_narrow.parallel.shards import divide, mark_tensor_parallel, split_for_rank, vocab_shard


def _normal_master(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(shape).normal_(0.0, std, generator=generator)


class _ShardedLinear(nn.Module):
    """A linear layer holding this rank's slice of a master weight (out_features, in_features) along
    `split_dim`; the bias, when there is one, is split with the output features (`bias_split`) or replicated.
    `options` are the subclass's keyword switches and their defaults."""

    split_dim: ClassVar[int]
    bias_split: ClassVar[bool]
    options: ClassVar[dict[str, bool]]

    def __init__(self, in_features: int, out_features: int, *, group: GroupInfo, bias: bool = True,
                 init_std: float = 0.02, generator: torch.Generator | None = None, **options: bool):
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option {', '.join(unknown)}; its options: "
                            f"{', '.join(self.options)}")
        for name, default in self.options.items():
            setattr(self, name, options.get(name, default))
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        dim = self.split_dim
        divide((out_features, in_features)[dim], group.size, ("out_features", "in_features")[dim])
        master = _normal_master((out_features, in_features), init_std, generator)
        self.weight = nn.Parameter(split_for_rank(master, dim, group.size, group.rank).clone())
        mark_tensor_parallel(self.weight, dim)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // group.size if self.bias_split else out_features))
            if self.bias_split:
                mark_tensor_parallel(self.bias, 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.group.size}"


class ColumnParallelLinear(_ShardedLinear):
    """Y = XA + b with A split by columns (output features): rank r holds A[:, r*n/p:(r+1)*n/p].

    Args:
        in_features: input size (replicated on every rank).
        out_features: full output size, split across the group.
        group: the tensor-parallel group.
        bias: add a bias (split like the output).
        gather_output: all-gather the output so every rank holds all of Y; otherwise Y stays split.
        init_std: std of the normal master weight; the bias starts at zero.
        generator: draws the master weight (pass the model's init generator for reproducible init).
    """

    split_dim, bias_split = 0, True
    options = {"gather_output": False}
    gather_output: bool

    def region_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as this layer's weight shard consumes it: identity forward; in backward the gradient is summed
        over the tensor-parallel group. For callers that use `weight` directly (attention through the
        weights)."""
        return copy_to_tensor_region(x, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.region_input(x), self.weight, self.bias)
        return gather_from_tensor_region(y, self.group) if self.gather_output else y


CPU_GEMM_OUTPUT_BYTES = 30 << 20


def _gemm_groups(layers: Sequence[ColumnParallelLinear], x: torch.Tensor) -> list[Sequence[ColumnParallelLinear]]:
    """Consecutive layers whose projections share one GEMM: all of them on an accelerator (its caching
    allocator reuses the output block); on the CPU as many as keep the output under ~30 MiB, because glibc
    hands larger blocks back to the OS on free and every forward would fault in fresh pages (measured: 13%
    of a NarrowBERT classification forward at batch 4 x 512, hidden 256)."""
    if x.device.type != "cpu":
        return [layers]
    groups: list[Sequence[ColumnParallelLinear]] = []
    start, out_bytes = 0, 0
    per_row = x.numel() // x.shape[-1] * x.element_size()
    for i, layer in enumerate(layers):
        size = layer.weight.shape[0] * per_row
        if i > start and out_bytes + size > CPU_GEMM_OUTPUT_BYTES:
            groups.append(layers[start:i])
            start, out_bytes = i, 0
        out_bytes += size
    groups.append(layers[start:])
    return groups


def column_parallel_projections(x: torch.Tensor, layers: Sequence[ColumnParallelLinear]) -> list[torch.Tensor]:
    """Several column-parallel projections of one input (a layer's Q, K, V; the K, V of every narrow layer),
    each output kept split across the group, computed as few GEMMs over the stacked weight shards.

    The input enters the tensor-parallel region once, so backward all-reduces its gradient once rather than
    once per projection. The weights stay separate parameters (the checkpoint layout of every release,
    and ZeRO's flat optimizer partitions, depend on it); stacking them costs one copy of the shards per
    forward (under 1 MiB a layer at hidden 256), and one GEMM over them measured faster than one GEMM per
    projection (benchmarks/RESULTS.md, [model-v2])."""
    if not layers:
        return []
    first = layers[0]
    if any(layer.gather_output or layer.group is not first.group or (layer.bias is None) != (first.bias is None)
           for layer in layers):
        raise ValueError("column_parallel_projections takes layers of one group, all with or all without a bias, "
                         "whose outputs stay split")
    x = first.region_input(x)
    outputs: list[torch.Tensor] = []
    for group in _gemm_groups(layers, x):
        if len(group) == 1:
            outputs.append(F.linear(x, group[0].weight, group[0].bias))
            continue
        weight = torch.cat([layer.weight for layer in group])
        bias = None if first.bias is None else torch.cat([layer.bias for layer in group])
        outputs.extend(F.linear(x, weight, bias).split([layer.weight.shape[0] for layer in group], dim=-1))
    return outputs


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          group: GroupInfo) -> torch.Tensor:
    """Logits of this rank's vocabulary shard against a vocabulary-parallel weight that lives elsewhere
    (the word embeddings, tied): (..., H) -> (..., V / tp). x is replicated; its gradient is summed over
    the group in backward."""
    return F.linear(copy_to_tensor_region(x, group), weight, bias)


class RowParallelLinear(_ShardedLinear):
    """Y = XA + b with A split by rows (input features): rank r holds A[r*n/p:(r+1)*n/p, :].

    The partial products are summed with an all-reduce; the bias is replicated and added after it.

    Args:
        in_features: full input size, split across the group.
        out_features: output size (replicated on every rank).
        group: the tensor-parallel group.
        bias: add a replicated bias.
        input_is_parallel: X already arrives split (from a column-parallel layer); otherwise it is split here.
        init_std: std of the normal master weight; the bias starts at zero.
        generator: draws the master weight.
    """

    split_dim, bias_split = 1, False
    options = {"input_is_parallel": True}
    input_is_parallel: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_region(x, self.group)
        y = reduce_from_tensor_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows; each rank looks up the ids in its range.

    The table is padded to `padded_vocab_size(num_embeddings, tp)` rows; the padding rows start at
    zero and are stripped on export. Out-of-range ids give zero on that rank; the all-reduce sums them.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: GroupInfo, padded_size: int | None = None,
                 init_std: float = 0.02, generator: torch.Generator | None = None):
        super().__init__()
        self.group = group
        self.num_embeddings = num_embeddings
        self.vocab_start, self.vocab_end, self.padded_size = vocab_shard(num_embeddings, group, padded_size)
        master = torch.zeros(self.padded_size, embedding_dim)
        master[:num_embeddings] = _normal_master((num_embeddings, embedding_dim), init_std, generator)
        self.weight = nn.Parameter(master[self.vocab_start:self.vocab_end].clone())
        mark_tensor_parallel(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_region(out, self.group)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings} (padded {self.padded_size}), tp={self.group.size}"
