"""Tensor-parallel building blocks: process groups, autograd collectives, parallel layers, RNG, and the one place
that splits, merges and re-pads shards (shards.py).

Knows nothing about BERT. Every function takes its process group explicitly; size-1 groups return
early, so TP=1 is the degenerate case of the same code and needs no torch.distributed at all.
"""

from megatron_narrow.parallel.cross_entropy import linear_cross_entropy, vocab_parallel_cross_entropy
from megatron_narrow.parallel.groups import GroupInfo, ProcessGroups
from megatron_narrow.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_projections,
    vocab_parallel_logits,
)
from megatron_narrow.parallel.mappings import (
    copy_to_tensor_region,
    gather_from_tensor_region,
    reduce_from_tensor_region,
    scatter_to_tensor_region,
)
from megatron_narrow.parallel.random import RNGStatesTracker, component_generator
from megatron_narrow.parallel.shards import (
    mark_tensor_parallel,
    merge_tensor_parallel,
    padded_vocab_size,
    refit_vocab_rows,
    split_for_rank,
    tensor_parallel_dims,
    vocab_padding_bias,
    vocab_shard,
)

__all__ = [
    "ColumnParallelLinear",
    "GroupInfo",
    "ProcessGroups",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "column_parallel_projections",
    "component_generator",
    "copy_to_tensor_region",
    "gather_from_tensor_region",
    "mark_tensor_parallel",
    "merge_tensor_parallel",
    "padded_vocab_size",
    "refit_vocab_rows",
    "reduce_from_tensor_region",
    "scatter_to_tensor_region",
    "split_for_rank",
    "tensor_parallel_dims",
    "linear_cross_entropy",
    "vocab_parallel_cross_entropy",
    "vocab_padding_bias",
    "vocab_parallel_logits",
    "vocab_shard",
]
