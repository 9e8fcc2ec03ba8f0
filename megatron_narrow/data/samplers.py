"""Distributed, resumable batch sampling over global sample indices (Megatron's pretraining sampler).

A training run consumes one global sequence of sample indices 0, 1, 2, ... in steps of
micro_batch_size * data_parallel_size; within a step, rank r takes the r-th micro-batch. The dataset
maps each global index onto an epoch and a shuffled sample, so the sampler never shuffles. Resuming
from `consumed_samples` (saved in the checkpoint) continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator


class DistributedPretrainingSampler:
    """Yields this rank's micro-batches: lists of global sample indices.

    Step s covers global positions [c_s, c_s + mb * dp) with c_s = consumed_samples + s * mb * dp, and
    rank r takes [c_s + r * mb, c_s + (r + 1) * mb). Shares of the ranks are disjoint and together cover
    the global sequence. With a finite total_samples, a last step that would run past it is dropped, so
    that every rank yields the same number of micro-batches.
    """

    def __init__(
        self,
        *,
        total_samples: int | None,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        """
        Args:
            total_samples: global samples of the run; None for an endless stream.
            consumed_samples: global samples already consumed (0 for a fresh run, the checkpoint's on resume).
            micro_batch_size: samples per micro-batch per rank.
            data_parallel_rank: this rank in the data-parallel group, in [0, data_parallel_size).
            data_parallel_size: ranks that share each step.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank must be in [0, data_parallel_size={data_parallel_size}), got {data_parallel_rank}"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if total_samples is not None:
            if total_samples < 1:
                raise ValueError(f"total_samples must be >= 1 or None, got {total_samples}")
            if consumed_samples > total_samples:
                raise ValueError(
                    f"consumed_samples={consumed_samples} exceeds total_samples={total_samples}: nothing left to sample"
                )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.step_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield; only for a finite total_samples."""
        if self.total_samples is None:
            raise TypeError("an endless DistributedPretrainingSampler (total_samples=None) has no length")
        return (self.total_samples - self.consumed_samples) // self.step_size

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        steps = itertools.count() if self.total_samples is None else range(len(self))
        for step in steps:
            first = offset + step * self.step_size
            yield list(range(first, first + self.micro_batch_size))
