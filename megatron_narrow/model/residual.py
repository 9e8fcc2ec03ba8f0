"""The post-LN residual exit that closes both halves of a BERT layer (attention and feed-forward)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.dropout import Dropout
from megatron_narrow.model.layer_norm import layer_norm
from megatron_narrow.parallel import ProcessGroups, RowParallelLinear


class PostNormResidual(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual), dense from `in_features` to the hidden size, row-parallel.

    Hugging Face has it twice (BertSelfOutput, BertOutput) with the same parameter names (dense, LayerNorm),
    so one class serves both and the state dict keys stay Hugging Face's."""

    def __init__(self, in_features: int, config: ModelConfig, groups: ProcessGroups,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.dense = RowParallelLinear(in_features, config.hidden_size, group=groups.tensor,
                                       init_std=config.initializer_range, generator=generator)
        self.LayerNorm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)
