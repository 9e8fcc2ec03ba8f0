"""Autograd-aware collectives over the tensor-parallel group, each paired with its backward dual.

Three tiers: private collectives (early return for a size-1 group), autograd Functions that pair a
forward with its dual, and public wrappers documented "fwd X / bwd Y". Splits and gathers act on the
last dimension. Outputs are allocated on the input's device, so gloo on the CPU works like NCCL.
"""

from __future__ import annotations

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


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split_last_dim(grad, ctx.group), None


def copy_to_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: identity / bwd: all-reduce. Enters a tensor-parallel region with a replicated input."""
    return x if group.size == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: all-reduce / bwd: identity. Sums partial results (row-parallel outputs) across ranks."""
    return x if group.size == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: keep this rank's slice of the last dim / bwd: all-gather."""
    return x if group.size == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tensor_region(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """fwd: all-gather along the last dim / bwd: keep this rank's slice."""
    return x if group.size == 1 else _GatherFromRegion.apply(x, group)
