"""Attention kernels behind one interface: (queries, keys, values, mask, dropout) -> outputs.

    q (B, h, Q, d), k and v (B, h, S, d), mask broadcastable to (B, h, Q, S) bool (True = may attend)

- `sdpa` (default): torch's scaled_dot_product_attention, which picks the best kernel the inputs allow. On
  the CPU with dropout it has no fused kernel and falls back to its math path, which computes bf16 inputs
  in fp32 and draws bernoulli_ masks; there `math` runs instead (same maths, the inputs' dtype, the
  cheaper masks of model/dropout.py).
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

from megatron_narrow.model.dropout import dropout

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   dropout_p: float) -> torch.Tensor:
    if dropout_p > 0 and q.device.type == "cpu":
        return math_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


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
