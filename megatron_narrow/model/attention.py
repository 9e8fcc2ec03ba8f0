"""The one attention primitive: queries for a subset of positions, keys and values from a context.

- ordinary layer: subset = all positions, context = the layer's own input;
- NarrowBERT narrow layer: subset = the narrow positions, context = the fixed output C of the
  full-length layers (K/V precomputed for all narrow layers in one GEMM by the encoder);
- token-drop transition layer: subset = the kept tokens, context = all tokens.
Heads are split across tensor-parallel ranks (query/key/value column-parallel, output row-parallel).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.attention_backends import attention_backend
from megatron_narrow.model.attention_mask import AttentionMask
from megatron_narrow.model.dropout import dropout
from megatron_narrow.model.recompute import recomputed
from megatron_narrow.model.residual import PostNormResidual
from megatron_narrow.parallel import (
    ColumnParallelLinear,
    ProcessGroups,
    RNGStatesTracker,
    column_parallel_projections,
)


def few_queries(num_queries: int, head_dim: int) -> bool:
    """Whether attending through the weights (BertSelfAttention.attend_through_weights) is cheaper than
    projecting keys and values for every context position: per head it costs ~Q x S x H against
    S x H x head_dim, so below head_dim queries; a margin of 4 covers its less efficient batched GEMMs."""
    return num_queries * 4 <= head_dim


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, h*d) -> (B, h, T, d)"""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, groups: ProcessGroups, generator: torch.Generator,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        h, std, tp = config.hidden_size, config.initializer_range, groups.tensor
        self.query = ColumnParallelLinear(h, h, group=tp, init_std=std, generator=generator)
        self.key = ColumnParallelLinear(h, h, group=tp, init_std=std, generator=generator)
        self.value = ColumnParallelLinear(h, h, group=tp, init_std=std, generator=generator)
        self.head_dim = config.head_dim
        self.kernel = attention_backend(config.attention_backend)
        self.dropout_p = config.attention_dropout
        self.tracker = tracker
        self.recompute_core = False
        """train.activation_checkpointing=selective: recompute scores, softmax and dropout in backward."""

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, h/tp, S, d) of every context position."""
        k, v = column_parallel_projections(context, (self.key, self.value))
        return split_heads(k, self.head_dim), split_heads(v, self.head_dim)

    def attend_through_weights(self, queries: torch.Tensor, context: torch.Tensor,
                               key_mask: AttentionMask | torch.Tensor) -> torch.Tensor:
        """Attention of a few query rows over every context position without projecting keys and values for
        all of them (NarrowBERT classification: [CLS] is the only query).

        Per head h: q.k_j = (W_K,h^T q).c_j + q.b_K,h, and the second term is the same for every j, so the
        softmax drops it; sum_j p_j v_j = W_V,h (sum_j p_j c_j) + b_V,h because the p_j sum to one. Equal to
        forward(queries, context=...) up to float rounding (with attention dropout: in distribution, the
        masks being drawn differently); the saving is S x H x head_dim per head.
        Returns this rank's heads, (B, Q, H/tp)."""
        b, q_len, hidden = queries.shape
        heads, d = self.key.weight.shape[0] // self.head_dim, self.head_dim
        q = split_heads(self.query(queries), d)  # (B, h, Q, d)
        context = self.key.region_input(context)  # key and value weights are both applied to it
        pulled = torch.einsum("bhqd,hdk->bhqk", q, self.key.weight.view(heads, d, hidden))  # (B, h, Q, H)
        scores = torch.einsum("bhqk,bsk->bhqs", pulled, context) * d ** -0.5  # (B, h, Q, S)
        probs = scores.masked_fill(~AttentionMask.of(key_mask).dense(), float("-inf")).softmax(dim=-1)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0:
            fork = self.tracker.fork() if self.tracker is not None else contextlib.nullcontext()
            with fork:
                probs = dropout(probs, dropout_p)
        mixed = torch.einsum("bhqs,bsk->bhqk", probs, context)  # (B, h, Q, H)
        out = torch.einsum("bhqk,hdk->bqhd", mixed, self.value.weight.view(heads, d, hidden))  # (B, Q, h, d)
        # sum_j p_j b_V: b_V itself without dropout; with it the kept probabilities need not sum to one
        weight = 1.0 if dropout_p == 0 else probs.sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, Q, h, 1)
        return (out + weight * self.value.bias.view(heads, d)).reshape(b, q_len, heads * d)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
              dropout_p: float) -> torch.Tensor:
        """The kernel, its dropout drawn from this rank's heads' stream."""
        fork = self.tracker.fork() if (self.tracker is not None and dropout_p > 0) else contextlib.nullcontext()
        with fork:
            return self.kernel(q, k, v, mask, dropout_p)

    def forward(self, queries: torch.Tensor, key_mask: AttentionMask | torch.Tensor, *,
                context: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                through_weights: bool = False) -> torch.Tensor:
        """queries (B, Q, H) attend to context (B, S, H), or to precomputed kv; key_mask an AttentionMask (the
        encoder's: segments), a key mask (B, S) True = real, or (B, Q, S) True where that query may attend that
        key.

        With neither context nor kv this is ordinary self-attention (Q, K, V from one region entry). With
        through_weights (the encoder walk decides: `few_queries`), queries against a context attend through the
        weights (attend_through_weights) instead of projecting keys and values for every context position.
        Returns this rank's heads, (B, Q, H/tp), ready for the row-parallel output projection.
        """
        if through_weights:
            return self.attend_through_weights(queries, context, key_mask)
        if kv is None and context is None:
            q, k, v = (split_heads(t, self.head_dim) for t in
                       column_parallel_projections(queries, (self.query, self.key, self.value)))
        else:
            q = split_heads(self.query(queries), self.head_dim)
            k, v = kv if kv is not None else self.project_kv(context)
        mask = AttentionMask.of(key_mask)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = recomputed(self._core, q, k, v, mask, dropout_p, tracker=self.tracker)
        else:
            out = self._core(q, k, v, mask, dropout_p)  # (B, h, Q, d)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, -1)  # (B, Q, h*d)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig, groups: ProcessGroups, generator: torch.Generator,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, groups, generator, tracker)
        self.output = PostNormResidual(config.hidden_size, config, groups, generator)

    def forward(self, queries: torch.Tensor, key_mask: torch.Tensor, *, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, through_weights: bool = False) -> torch.Tensor:
        return self.output(self.self(queries, key_mask, context=context, kv=kv, through_weights=through_weights),
                           queries)
