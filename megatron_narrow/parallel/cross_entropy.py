"""Cross-entropy over logits whose vocabulary dimension is split across the tensor-parallel group.

Never gathers the [N, V] logits: each rank reduces its shard to a max, a sum of exponentials and the
target logit (three all-reduces of [N] tensors); the backward is softmax minus one-hot, locally.

On a single rank the [N, V] logits (the largest tensor of a NarrowBERT step) are visited a few rows at a
time: no fp32 copy of them, no fp32 log-probabilities, no zero-filled gradient of the log-probabilities is
ever made, only the gradient itself, in the logits' dtype. Fresh tensors of that size are not free on the
CPU: an allocation above glibc's 32 MB mmap ceiling is faulted in page by page at every step (11 ms for 40
MB on a 2-core EPYC, where a pass over memory already resident costs 0.4 ms). torch's cross_entropy on
`logits.float()` makes four of them; this makes one in fp32 and none in bf16 (20 MB stays in the heap).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_narrow.parallel.groups import GroupInfo


def _all_reduce(x: torch.Tensor, group: GroupInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group.size > 1:
        dist.all_reduce(x, op=op, group=group.group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: GroupInfo) -> torch.Tensor:
        local_vocab = logits.shape[-1]
        start = group.rank * local_vocab
        logits_max = _all_reduce(logits.max(dim=-1).values.float(), group, dist.ReduceOp.MAX)
        shifted = logits.float() - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = _all_reduce(target_logit, group)
        exp = shifted.exp_()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax * grad_loss.unsqueeze(-1)  # (softmax - one-hot) * dloss, one pass over [N, V]
        flat = grad.view(-1, grad.shape[-1])
        rows = torch.arange(flat.shape[0], device=grad.device)
        flat[rows, local_target.reshape(-1)] -= (~outside).reshape(-1).to(grad.dtype) * grad_loss.reshape(-1)
        return grad.to(ctx.input_dtype), None, None


ROWS_BYTES = 1 << 21
"""fp32 bytes of logits handled at once on a single rank: a few rows, in cache, below the mmap ceiling."""


def _shift_into(out: torch.Tensor, rows: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """out = rows - row_max in fp32: one pass for fp32 rows; bf16/fp16 rows are first copied into `out` (a
    mixed-dtype subtraction would cast them into a fresh temporary)."""
    if rows.dtype == out.dtype:
        return torch.sub(rows, row_max, out=out)
    return out.copy_(rows).sub_(row_max)


class _RowChunkedCrossEntropy(torch.autograd.Function):
    """Single-rank cross-entropy in fp32, a few rows at a time in one reused buffer (see the module docstring).
    Each row's max m and the log-sum-exp l of x - m are kept: the backward is exp(x - m - l) * dloss minus the
    one-hot, m and l subtracted apart so that large logits lose no digits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        buffer = torch.empty(max(1, min(rows, ROWS_BYTES // (4 * vocab))), vocab, device=logits.device)
        row_max, log_sum, loss = (torch.empty(rows, 1, device=logits.device) for _ in range(3))
        for start in range(0, rows, len(buffer)):
            end = min(start + len(buffer), rows)
            chunk, shifted = logits[start:end], buffer[:end - start]
            row_max[start:end] = chunk.amax(dim=-1, keepdim=True)
            _shift_into(shifted, chunk, row_max[start:end])  # as log_softmax: no cancellation at large logits
            target_shifted = shifted.gather(-1, target[start:end, None])
            torch.log(shifted.exp_().sum(dim=-1, keepdim=True), out=log_sum[start:end])
            torch.sub(log_sum[start:end], target_shifted, out=loss[start:end])
        ctx.save_for_backward(logits, target, row_max, log_sum)
        return loss.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target, row_max, log_sum = ctx.saved_tensors
        rows, vocab = logits.shape
        buffer = torch.empty(max(1, min(rows, ROWS_BYTES // (4 * vocab))), vocab, device=logits.device)
        grad = torch.empty_like(logits)
        weight = grad_loss.float()
        in_place = grad.dtype == buffer.dtype  # fp32 logits: the gradient is computed where it is returned
        for start in range(0, rows, len(buffer)):
            end = min(start + len(buffer), rows)
            probs = grad[start:end] if in_place else buffer[:end - start]
            _shift_into(probs, logits[start:end], row_max[start:end]).sub_(log_sum[start:end]).exp_()
            probs.mul_(weight[start:end, None])
            probs[torch.arange(end - start, device=probs.device), target[start:end]] -= weight[start:end]
            if not in_place:
                grad[start:end].copy_(probs)
        return grad, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """Per-position loss [...] (fp32) from vocabulary-split logits [..., V/tp] and global target ids [...]."""
    if group.size == 1:
        flat = logits.reshape(-1, logits.shape[-1])
        return _RowChunkedCrossEntropy.apply(flat, target.reshape(-1)).view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, group)
