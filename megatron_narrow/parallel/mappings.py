"""Autograd-aware collectives over the tensor-parallel group, each paired with its backward dual.

Three tiers: private collectives (early return for a size-1 group), one autograd Function that pairs a
forward collective with its dual, and public wrappers documented "fwd X / bwd Y". Splits and gathers act on the
last dimension. Outputs are allocated on the input's device, so gloo on the CPU works like NCCL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_narrow.parallel.groups import GroupInfo


def _all_reduce(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    if group.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group.group)
    return x


def _split_last_dim(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    if group.size == 1:
        return x
    if x.shape[-1] % group.size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {group.size}")
    return x.chunk(group.size, dim=-1)[group.rank].contiguous()


def _gather_last_dim(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    if group.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x, group=group.group)
    return torch.cat(parts, dim=-1)


def _identity(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    return x


def _all_reduce_copy(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    return _all_reduce(x.clone(), group)  # never in place on a tensor autograd saved


Collective = Callable[[torch.Tensor, GroupInfo], torch.Tensor]


class _Dual(torch.autograd.Function):
    """forward: `op` over the group; backward: its dual `dual` on the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupInfo, op: Collective, dual: Collective) -> torch.Tensor:
        ctx.group, ctx.dual = group, dual
        return op(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.dual(grad, ctx.group), None, None, None


def copy_to_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: identity / bwd: all-reduce. Enters a tensor-parallel region with a replicated input."""
    return x if group.size == 1 else _Dual.apply(x, group, _identity, _all_reduce_copy)


def reduce_from_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: all-reduce / bwd: identity. Sums partial results (row-parallel outputs) across ranks."""
    return x if group.size == 1 else _Dual.apply(x, group, _all_reduce_copy, _identity)


def scatter_to_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: keep this rank's slice of the last dim / bwd: all-gather."""
    return x if group.size == 1 else _Dual.apply(x, group, _split_last_dim, _gather_last_dim)


def gather_from_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: all-gather along the last dim / bwd: keep this rank's slice."""
    return x if group.size == 1 else _Dual.apply(x, group, _gather_last_dim, _split_last_dim)
