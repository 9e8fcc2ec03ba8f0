"""Attention kernels behind one interface: (queries, keys, values, mask, dropout) -> outputs.

    q (B, h, Q, d), k and v (B, h, S, d), mask an AttentionMask (model/attention_mask.py: segments, and the
    dense (B, 1, Q, S) bool on demand)

- `sdpa` (default): torch's scaled_dot_product_attention, which picks the best kernel the inputs allow. On
  the CPU with dropout it has no fused kernel and falls back to its math path, which computes bf16 inputs
  in fp32 and draws bernoulli_ masks; there `cpu_training_attention` runs instead (math's maths in the
  inputs' dtype, fewer passes over the scores, the cheaper masks of model/dropout.py).
- `math`: the readable reference, softmax(q k^T / sqrt(d) + mask) v written out; the other backends are
  tested against it.
- `varlen`: every (row, segment) attends alone, as variable-length sequences (cumulative lengths over the
  gathered real tokens): FlashAttention-2's `flash_attn_varlen_func` on CUDA when flash_attn is installed
  (separate lengths for queries and keys: NarrowBERT's queries and token dropping's kept rows), else torch's
  SDPA on jagged NestedTensors. Both keep attention dropout, which FlashAttention-3, torch's varlen_attn and
  FlexAttention lack. Packed rows then cost their real tokens, not the padded square.
A backend that this machine cannot run is refused by `attention_backend(name)` in one line. NarrowBERT's
"attend through the weights" for a few queries (model/attention.py) is a strategy of the layer, not a
backend: it holds under every backend.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_narrow.model.attention_mask import AttentionMask
from megatron_narrow.model.dropout import dropout, dropout_unscaled

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask, float], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   dropout_p: float) -> torch.Tensor:
    if dropout_p > 0 and q.device.type == "cpu":
        return cpu_training_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), dropout_p=dropout_p)


def cpu_training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                           dropout_p: float) -> torch.Tensor:
    """math_attention's maths with fewer passes over the B x h x Q x S scores, for training on the CPU (where
    SDPA has no fused dropout): the key mask becomes an additive bias that the batched GEMM adds, and the
    1/sqrt(d) scale its alpha, as it writes the scores (baddbmm); dropout's 1/(1-p) scales v (S x d), not
    the probabilities. The dropout mask is the one math_attention draws from the same generator state."""
    b, h, queries, d = q.shape
    keys = k.shape[-2]
    mask = mask.dense()
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    bias = bias.expand(b, h, mask.shape[-2], keys).reshape(b * h, mask.shape[-2], keys)
    scores = torch.baddbmm(bias, q.reshape(b * h, queries, d), k.reshape(b * h, keys, d).transpose(1, 2),
                           alpha=d ** -0.5)
    probs, scale = dropout_unscaled(scores.softmax(dim=-1), dropout_p)
    return torch.bmm(probs, (v * scale).reshape(b * h, keys, d)).view(b, h, queries, d)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   dropout_p: float) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask.dense(), float("-inf")).softmax(dim=-1)
    if dropout_p > 0:
        probs = dropout(probs, dropout_p)
    return probs @ v


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                     dropout_p: float) -> torch.Tensor:
    """Each (row, segment) attends alone, as variable-length sequences: the queries and real keys of every
    segment are gathered into one (tokens, heads, d) tensor with cumulative lengths, so no score is computed
    for padding or across segments. A query row of segment 0 (padding nobody reads) gets zeros. A mask given
    only densely (no segments) goes to `sdpa`."""
    if not mask.has_segments:
        return sdpa_attention(q, k, v, mask, dropout_p)
    b, h, num_queries, d = q.shape
    keys = k.shape[2]
    query_segments, key_segments = mask.rows(num_queries)
    span = int(torch.maximum(query_segments.max(), key_segments.max())) + 1
    row_base = torch.arange(b, device=q.device)[:, None] * span
    query_groups, key_groups = (row_base + query_segments).flatten(), (row_base + key_segments).flatten()
    query_rows = _rows_by_group(query_groups, query_segments.flatten() != 0)
    groups, query_counts = torch.unique_consecutive(query_groups[query_rows], return_counts=True)
    key_rows = _rows_by_group(key_groups, (key_segments.flatten() != 0) & torch.isin(key_groups, groups))
    key_groups_found, key_counts = torch.unique_consecutive(key_groups[key_rows], return_counts=True)
    if not torch.equal(key_groups_found, groups):
        raise ValueError("varlen attention: a query's segment has no real key")
    flat_q = q.transpose(1, 2).reshape(b * num_queries, h, d)[query_rows]
    flat_k = k.transpose(1, 2).reshape(b * keys, h, d)[key_rows]
    flat_v = v.transpose(1, 2).reshape(b * keys, h, d)[key_rows]
    out = _varlen_kernel(flat_q, flat_k, flat_v, _offsets(query_counts), _offsets(key_counts), dropout_p)
    full = q.new_zeros(b * num_queries, h, d).index_copy(0, query_rows, out)
    return full.view(b, num_queries, h, d).transpose(1, 2)


def _rows_by_group(groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Indices of the kept entries, ordered by group (stable: in position order within a group)."""
    rows = keep.nonzero().squeeze(1)
    return rows[torch.sort(groups[rows], stable=True).indices]


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_offsets: torch.Tensor,
                   key_offsets: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """(tokens, h, d) queries against (tokens, h, d) keys/values, sequence i spanning offsets[i]:offsets[i+1]:
    FlashAttention-2's varlen kernel on CUDA in half precision when flash_attn is installed, else torch's SDPA
    on jagged NestedTensors (both keep attention dropout)."""
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        lengths_q, lengths_k = query_offsets.diff(), key_offsets.diff()
        return flash(q, k, v, query_offsets.to(torch.int32), key_offsets.to(torch.int32), int(lengths_q.max()),
                     int(lengths_k.max()), dropout_p=dropout_p, softmax_scale=q.shape[-1] ** -0.5, causal=False)
    nested = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
              for t, offsets in ((q, query_offsets), (k, key_offsets), (v, key_offsets))]
    with warnings.catch_warnings():  # torch's CPU path says its nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        out = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p)
    return out.transpose(1, 2).values()


@functools.cache
def _flash_varlen():
    """flash_attn's flash_attn_varlen_func, or None where flash_attn is not installed (asked once: a failed
    import is not cached by Python, and every layer would search sys.path again)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


BACKENDS: dict[str, AttentionKernel] = {"sdpa": sdpa_attention, "math": math_attention, "varlen": varlen_attention}


def attention_backend(name: str) -> AttentionKernel:
    """The kernel called `name`; a one-line ValueError naming the choices for any other."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not available here; choose one of "
                         f"{', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]
