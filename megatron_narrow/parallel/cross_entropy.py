"""Cross-entropy over logits whose vocabulary dimension is split across the tensor-parallel group.

Never gathers the [N, V] logits: each rank reduces its shard to a max, a sum of exponentials and the
target logit (three all-reduces of [N] tensors); the backward is softmax minus one-hot, locally.

On a single rank the [N, V] logits (the largest tensor of a NarrowBERT step) are visited a few rows at a
time: no fp32 copy of them, no fp32 log-probabilities, no zero-filled gradient of the log-probabilities is
ever made, only the gradient itself, in the logits' dtype. Fresh tensors of that size are not free on the
CPU: an allocation above glibc's 32 MB mmap ceiling is faulted in page by page at every step (11 ms for 40
MB on a 2-core EPYC, where a pass over memory already resident costs 0.4 ms). torch's cross_entropy on
`logits.float()` makes four of them; this makes one in fp32 and none in bf16 (20 MB stays in the heap).

Training on a single rank goes one step further (`linear_cross_entropy`): the decoder GEMM, the loss and the
gradients of x, the decoder weight and its bias are made together, a chunk of rows at a time: one chunk of
logits (LOGITS_CHUNK_BYTES at most) is made and overwritten by its own gradient, where the two-step path holds the
[N, V] logits and their gradient (the approach of Liger-Kernel's fused linear cross-entropy). The decoder weight's
gradient arrives contiguous and alone, so autograd adds the tied embedding's gradient into it in place.
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


LOGITS_CHUNK_BYTES = 64 << 20
"""Logits (in the weight's dtype) that linear_cross_entropy makes at once: it bounds the loss's memory whatever
the batch. Large, because on the CPU the decoder GEMMs lose to chunking: one 39 MB chunk measured faster than two
of 20 MB in an fp32 NarrowBERT step (batch 4 x 80 targets, vocabulary 30592, 2-core EPYC)."""


def _loss_and_gradient(logits: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                       losses: torch.Tensor) -> None:
    """Per-row cross-entropy of `logits` (n, V) into `losses` (n,), and `logits` overwritten by its
    gradient row_weight * (softmax - one-hot), both computed in fp32 a few rows at a time (in place for fp32
    logits, through one small fp32 buffer otherwise)."""
    rows, vocab = logits.shape
    step = max(1, min(rows, ROWS_BYTES // (4 * vocab)))
    buffer = None if logits.dtype == torch.float32 else torch.empty(step, vocab, device=logits.device)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        chunk = logits[start:end]
        work = chunk if buffer is None else buffer[:end - start].copy_(chunk)
        work.sub_(work.amax(dim=-1, keepdim=True))  # as log_softmax: no cancellation at large logits
        target_shifted = work.gather(-1, target[start:end, None])
        sum_exp = work.exp_().sum(dim=-1, keepdim=True)
        torch.sub(sum_exp.log(), target_shifted, out=losses[start:end, None])
        weight = row_weight[start:end, None]
        work.mul_(weight / sum_exp)
        work[torch.arange(end - start, device=work.device), target[start:end]] -= weight.squeeze(-1)
        if buffer is not None:
            chunk.copy_(work)


class _LinearCrossEntropy(torch.autograd.Function):
    """(sum_r w_r CE(x_r W^T + b, t_r), the per-row losses) with every gradient made in forward, chunk by chunk.

    The loss is linear in the row weights w, so the gradients of x, W and b are those of w-weighted rows times
    the scalar that reaches backward: forward computes them, backward scales them. Weight and bias
    gradients are sums over chunks; in bf16/fp16 they are summed in fp32 and rounded once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                valid: torch.Tensor, denominator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = x.shape[0], weight.shape[0]
        chunk = max(1, min(rows, LOGITS_CHUNK_BYTES // (vocab * weight.element_size())))
        logits = torch.empty(chunk, vocab, dtype=weight.dtype, device=x.device)
        valid = valid.to(torch.float32)
        row_weight = valid / denominator
        losses = torch.empty(rows, device=x.device)
        grad_x = torch.empty_like(x)
        grad_weight, grad_bias = None, None
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            rows_x, out = x[start:end], logits[:end - start]
            if bias is None:
                torch.mm(rows_x, weight.t(), out=out)
            else:
                torch.addmm(bias, rows_x, weight.t(), out=out)
            _loss_and_gradient(out, target[start:end], row_weight[start:end], losses[start:end])
            torch.mm(out, weight, out=grad_x[start:end])
            if grad_weight is None:  # the first chunk; with one chunk the GEMM rounds the gradient once
                grad_weight = out.t().mm(rows_x)
                if end < rows and grad_weight.dtype != torch.float32:
                    grad_weight = grad_weight.float()
            elif grad_weight.dtype == out.dtype:
                grad_weight.addmm_(out.t(), rows_x)
            else:
                grad_weight.add_(out.t().mm(rows_x))
            if bias is not None:  # summed in the logits' dtype (torch accumulates in fp32): no fp32 copy of them
                partial = out.sum(dim=0)
                grad_bias = partial.float() if grad_bias is None else grad_bias.add_(partial)
        losses.mul_(valid)
        ctx.grads = (grad_x, grad_weight.to(weight.dtype), None if bias is None else grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses.sum() / denominator), losses

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_losses: torch.Tensor | None):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already handed out: a second backward "
                               "through it (retain_graph=True) is not supported")
        grads, ctx.grads = ctx.grads, None  # handed over, not copied: a tied weight's other gradient adds in place
        if not bool(grad_loss == 1):
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        grad_x, grad_weight, grad_bias = grads
        return grad_x, grad_weight, grad_bias, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         valid: torch.Tensor, denominator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single rank: (sum of the valid rows' losses / denominator, per-row losses [...] fp32, 0 where invalid) of
    logits x W^T + b ([..., H] x [V, H]) against targets [...], without making the [N, V] logits (see the module
    docstring). Equal to vocab_parallel_cross_entropy on F.linear(x, weight, bias) up to float rounding; only
    the loss carries a gradient. fp32 and bf16: fp16 gradients made before the loss scale reaches them would
    underflow."""
    if weight.dtype == torch.float16:
        raise ValueError("linear_cross_entropy takes fp32 or bf16 weights: in fp16 the gradients it makes before "
                         "the loss scale reaches them underflow; use F.linear and vocab_parallel_cross_entropy")
    total, losses = _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, bias, target.reshape(-1),
                                              valid.reshape(-1), denominator)
    return total, losses.view(target.shape)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """Per-position loss [...] (fp32) from vocabulary-split logits [..., V/tp] and global target ids [...]."""
    if group.size == 1:
        flat = logits.reshape(-1, logits.shape[-1])
        return _RowChunkedCrossEntropy.apply(flat, target.reshape(-1)).view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, group)
