"""The TP x PP x DP process groups as one explicit object, passed to whoever needs a group.

Rank order follows Megatron: tensor-parallel ranks are adjacent (fastest varying, so they share a
node and its fast links), then data parallel, then pipeline stages:
    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_narrow.config import ParallelConfig


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One process group with this process's rank in it; `group` is None for a size-1 group."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    ranks: tuple[int, ...]

    @classmethod
    def trivial(cls, global_rank: int = 0) -> GroupInfo:
        return cls(group=None, rank=0, size=1, ranks=(global_rank,))


@dataclass(frozen=True, slots=True)
class ProcessGroups:
    """This process's tensor-, data- and pipeline-parallel groups."""

    tensor: GroupInfo
    data: GroupInfo
    pipeline: GroupInfo
    global_rank: int = 0

    @classmethod
    def single(cls) -> ProcessGroups:
        """One process: every group has size 1 and no torch.distributed call is ever made."""
        return cls(GroupInfo.trivial(), GroupInfo.trivial(), GroupInfo.trivial())

    @classmethod
    def from_world(cls, layout: ParallelConfig) -> ProcessGroups:
        """Create the groups of `layout` over the initialised default process group (all ranks call this)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        layout = layout.resolve(world)
        tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
        assert dp is not None
        mine: dict[str, GroupInfo] = {}

        def make(kind: str, all_ranks: list[list[int]]) -> None:
            for ranks in all_ranks:  # every rank must create every group, in the same order
                group = dist.new_group(ranks)  # size-1 groups too: DeepSpeed reads them through the MPU
                if rank in ranks:
                    mine[kind] = GroupInfo(group=group, rank=ranks.index(rank), size=len(ranks), ranks=tuple(ranks))

        make("tensor", [[p * dp * tp + d * tp + t for t in range(tp)] for p in range(pp) for d in range(dp)])
        make("data", [[p * dp * tp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)])
        make("pipeline", [[p * dp * tp + d * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)])
        return cls(tensor=mine["tensor"], data=mine["data"], pipeline=mine["pipeline"], global_rank=rank)

    @classmethod
    def from_grid(cls, grid) -> ProcessGroups:
        """The groups of DeepSpeed's `PipelineParallelGrid` (same rank order as `from_world`), so that the
        parallel layers and DeepSpeed (gradient all-reduce, gradient norm, tied weights) share communicators."""

        def info(group, ranks: list[int]) -> GroupInfo:
            return GroupInfo(group=group, rank=ranks.index(grid.global_rank), size=len(ranks), ranks=tuple(ranks))

        return cls(tensor=info(grid.get_slice_parallel_group(), list(grid.slice_group)),
                   data=info(grid.get_data_parallel_group(), list(grid.dp_group)),
                   pipeline=info(grid.get_pipe_parallel_group(), list(grid.pp_group)),
                   global_rank=grid.global_rank)
