"""Output heads: the MLM head (on target rows only, decoder tied to the word embeddings), pooler,
sequence- and token-classification heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.dropout import Dropout
from megatron_narrow.model.layer_norm import layer_norm
from megatron_narrow.parallel import (
    GroupInfo,
    mark_tensor_parallel,
    vocab_padding_bias,
    vocab_parallel_logits,
    vocab_shard,
)


def _linear(in_features: int, out_features: int, std: float, generator: torch.Generator) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.normal_(0.0, std, generator=generator)
        linear.bias.zero_()
    return linear


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: ModelConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.dense = _linear(config.hidden_size, config.hidden_size, config.initializer_range, generator)
        self.LayerNorm = layer_norm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """logits = transform(x) @ E^T + b over this rank's vocabulary shard; padded columns masked to -inf.

    Runs only on the rows it is given (the MLM targets), which is where a sparse head saves the
    [B*S, V] GEMM of a dense one. The decoder E is the word-embedding table, passed in by the caller
    (the model's own, or a pipeline's tied copy on the last stage): the head owns only transform and b.
    """

    def __init__(self, config: ModelConfig, group: GroupInfo, generator: torch.Generator) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config, generator)
        self.group = group
        start, end, _ = vocab_shard(config.vocab_size, group)
        self.bias = nn.Parameter(torch.zeros(end - start))
        mark_tensor_parallel(self.bias, 0)
        # -inf on the padding columns: a buffer, not in the parameter (AdamW's decay of -inf is NaN), and not
        # persistent (checkpoints stay as HF's)
        self.register_buffer("padding_bias", vocab_padding_bias(config.vocab_size, group), persistent=False)

    def decoder_bias(self) -> torch.Tensor:
        """The decoder's bias over this rank's shard, -inf on padding columns."""
        return self.bias if self.padding_bias is None else self.bias + self.padding_bias.to(self.bias.dtype)

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V_padded / tp) logits of this rank's vocabulary shard."""
        return vocab_parallel_logits(self.transform(x), decoder_weight, self.decoder_bias(), self.group)


class BertPooler(nn.Module):
    def __init__(self, config: ModelConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.dense = _linear(config.hidden_size, config.hidden_size, config.initializer_range, generator)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden state of [CLS] -> (B, H)"""
        return torch.tanh(self.dense(first_token))


class ClassificationHead(nn.Module):
    """dropout + linear, on pooled [CLS] states (sequence) or on token states (token classification)."""

    def __init__(self, config: ModelConfig, num_labels: int, generator: torch.Generator) -> None:
        super().__init__()
        self.dropout = Dropout(config.hidden_dropout)
        self.classifier = _linear(config.hidden_size, num_labels, config.initializer_range, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))
