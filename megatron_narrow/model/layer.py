"""One post-LN BERT layer: attention (the subset-query primitive) then the feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.attention import BertAttention
from megatron_narrow.model.recompute import recomputed
from megatron_narrow.model.residual import PostNormResidual
from megatron_narrow.parallel import ColumnParallelLinear, ProcessGroups, RNGStatesTracker


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig, groups: ProcessGroups, generator: torch.Generator) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, group=groups.tensor,
                                          init_std=config.initializer_range, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf GELU, as Hugging Face's "gelu"


class BertLayer(nn.Module):
    """A layer whose parameters are exactly a Hugging Face BertLayer's; what it attends over is the caller's."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups, generator: torch.Generator,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        self.attention = BertAttention(config, groups, generator, tracker)
        self.intermediate = BertIntermediate(config, groups, generator)
        self.output = PostNormResidual(config.intermediate_size, config, groups, generator)
        self.recompute = False
        """train.activation_checkpointing=full: keep the inputs only (model/recompute.py)."""

    def forward(self, queries: torch.Tensor, key_mask: torch.Tensor, *, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, through_weights: bool = False) -> torch.Tensor:
        """queries (B, Q, H) -> (B, Q, H); see BertSelfAttention.forward for context, kv and through_weights."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return recomputed(self._forward, queries, key_mask, context=context, kv=kv, through_weights=through_weights,
                              tracker=self.attention.self.tracker)
        return self._forward(queries, key_mask, context=context, kv=kv, through_weights=through_weights)

    def _forward(self, queries: torch.Tensor, key_mask: torch.Tensor, *, context: torch.Tensor | None,
                 kv: tuple[torch.Tensor, torch.Tensor] | None, through_weights: bool) -> torch.Tensor:
        x = self.attention(queries, key_mask, context=context, kv=kv, through_weights=through_weights)
        return self.output(self.intermediate(x), x)
