"""Attention kernels behind one interface: (queries, keys, values, mask, dropout) -> outputs.

    q (B, h, Q, d), k and v (B, h, S, d), mask broadcastable to (B, h, Q, S) bool (True = may attend)

- `sdpa` (default): torch's scaled_dot_product_attention, which picks the best kernel the inputs allow. On
  the CPU with dropout it has no fused kernel and falls back to its math path, which computes bf16 inputs
  in fp32 and draws bernoulli_ masks; there `cpu_training_attention` runs instead (math's maths in the
  inputs' dtype, fewer passes over the scores, the cheaper masks of model/dropout.py).
- `math`: the readable reference, softmax(q k^T / sqrt(d) + mask) v written out; the other backends are
  tested against it.
A backend that this machine cannot run is refused by `attention_backend(name)` in one line. NarrowBERT's
"attend through the weights" for a few queries (model/attention.py) is a strategy of the layer, not a
backend: it holds under every backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_narrow.model.dropout import dropout, dropout_unscaled

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   dropout_p: float) -> torch.Tensor:
    if dropout_p > 0 and q.device.type == "cpu":
        return cpu_training_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def cpu_training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           dropout_p: float) -> torch.Tensor:
    """math_attention's maths with fewer passes over the B x h x Q x S scores, for training on the CPU (where
    SDPA has no fused dropout): the key mask becomes an additive bias that the batched GEMM adds, and the
    1/sqrt(d) scale its alpha, as it writes the scores (baddbmm); dropout's 1/(1-p) scales v (S x d), not
    the probabilities. The dropout mask is the one math_attention draws from the same generator state."""
    b, h, queries, d = q.shape
    keys = k.shape[-2]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    bias = bias.expand(b, h, mask.shape[-2], keys).reshape(b * h, mask.shape[-2], keys)
    scores = torch.baddbmm(bias, q.reshape(b * h, queries, d), k.reshape(b * h, keys, d).transpose(1, 2),
                           alpha=d ** -0.5)
    probs, scale = dropout_unscaled(scores.softmax(dim=-1), dropout_p)
    return torch.bmm(probs, (v * scale).reshape(b * h, keys, d)).view(b, h, queries, d)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   dropout_p: float) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    if dropout_p > 0:
        probs = dropout(probs, dropout_p)
    return probs @ v


BACKENDS: dict[str, AttentionKernel] = {"sdpa": sdpa_attention, "math": math_attention}


def attention_backend(name: str) -> AttentionKernel:
    """The kernel called `name`; a one-line ValueError naming the choices for any other."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not available here; choose one of "
                         f"{', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]
