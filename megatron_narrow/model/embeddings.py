"""Word (vocabulary-parallel), learned position and token-type embeddings, summed, LayerNorm, dropout."""

from __future__ import annotations

import torch
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.dropout import Dropout
from megatron_narrow.model.layer_norm import layer_norm
from megatron_narrow.parallel import ProcessGroups, VocabParallelEmbedding


def _embedding(num: int, dim: int, std: float, generator: torch.Generator) -> nn.Embedding:
    table = nn.Embedding(num, dim)
    with torch.no_grad():
        table.weight.normal_(0.0, std, generator=generator)
    return table


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig, groups: ProcessGroups, generator: torch.Generator) -> None:
        super().__init__()
        std = config.initializer_range
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group=groups.tensor,
                                                      init_std=std, generator=generator)
        self.position_embeddings = _embedding(config.max_position_embeddings, config.hidden_size, std, generator)
        self.token_type_embeddings = _embedding(config.type_vocab_size, config.hidden_size, std, generator)
        self.LayerNorm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """position_ids (B, S): packed segments restart them; None is 0..S-1."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {seq_len} tokens exceeds the {self.position_embeddings.num_embeddings} "
                             "learned positions")
        positions = torch.arange(seq_len, device=input_ids.device) if position_ids is None else position_ids
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, S, H)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))
