"""BertModel and the task models. Module names follow Hugging Face's BERT (bert.embeddings,
bert.encoder.layer.N.attention.self.query, cls.predictions.transform, ...) so that conversion is a
table. The loss lives with the model: the pretraining forward returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.embeddings import BertEmbeddings
from megatron_narrow.model.encoder import BertEncoder
from megatron_narrow.model.heads import BertLMPredictionHead, BertPooler, ClassificationHead, _linear
from megatron_narrow.model.token_drop import TokenImportance
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker, vocab_parallel_cross_entropy

DEFAULT_SPECIAL_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}  # BERT's WordPiece ids


class BertModel(nn.Module):
    """Embeddings + encoder (+ pooler). `forward` returns hidden states at the query positions."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups | None = None, *, add_pooler: bool = False,
                 tracker: RNGStatesTracker | None = None, special_ids: dict[str, int] | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        groups = groups or ProcessGroups.single()
        config.validate(tensor_parallel=groups.tensor.size)
        self.config = config
        self.groups = groups
        if generator is None:
            generator = torch.Generator().manual_seed(config.init_seed)
        self.embeddings = BertEmbeddings(config, groups, generator)
        self.encoder = BertEncoder(config, groups, generator, tracker)
        self.pooler = BertPooler(config, generator) if add_pooler else None
        self.token_importance = None
        if config.variant == "token_drop":
            special = special_ids or DEFAULT_SPECIAL_IDS
            self.token_importance = TokenImportance(
                config.vocab_size, special_ids=tuple(special.values()), pad_id=special["pad"],
                init=config.importance_init, beta=config.importance_beta)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, query_positions: torch.Tensor | None = None,
                query_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids -> (B, Q, H) at query_positions (B, Q), or (B, S, H) when None.

        narrow computes its last layers only for the query positions; token_drop also forces them
        (where query_valid) into the kept set.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        return self.encoder(hidden, attention_mask, query_positions, importance=self.token_importance,
                            input_ids=input_ids, forced_valid=query_valid)


@dataclass
class PretrainingOutput:
    loss: torch.Tensor
    """Mean MLM loss over valid targets (+ the pair-task loss, when there is one)."""
    target_losses: torch.Tensor
    """(B, M) per-target MLM loss (0 where invalid): feeds the token-drop importance update."""
    logits: torch.Tensor
    """(B, M, V_padded / tp) this rank's shard of the MLM logits at the target positions."""
    pair_logits: torch.Tensor | None = None


class BertForPreTraining(nn.Module):
    """MLM (sparse: only target rows reach the head) and an optional NSP/SOP head on the pooled [CLS]."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups | None = None, *, pair_head: bool = False,
                 tracker: RNGStatesTracker | None = None, special_ids: dict[str, int] | None = None) -> None:
        super().__init__()
        groups = groups or ProcessGroups.single()
        generator = torch.Generator().manual_seed(config.init_seed)
        self.bert = BertModel(config, groups, add_pooler=pair_head, tracker=tracker, special_ids=special_ids,
                              generator=generator)
        self.cls = nn.Module()
        self.cls.predictions = BertLMPredictionHead(config, self.bert.embeddings.word_embeddings, groups.tensor,
                                                    generator)
        self.cls.seq_relationship = _linear(config.hidden_size, 2, config.initializer_range, generator) \
            if pair_head else None
        self.groups = groups

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                target_positions: torch.Tensor, target_ids: torch.Tensor, target_valid: torch.Tensor,
                pair_label: torch.Tensor | None = None, num_targets: torch.Tensor | None = None) -> PretrainingOutput:
        """MLM (+ pair) loss. `num_targets` replaces this batch's valid-target count as the MLM loss's
        denominator: the training loop passes the global batch's count (per rank and micro-batch), so
        that data parallelism and gradient accumulation reproduce one big batch exactly."""
        if self.cls.seq_relationship is not None:  # the pooler needs [CLS]: query it alongside the targets
            zeros = torch.zeros_like(target_positions[:, :1])
            positions = torch.cat([zeros, target_positions], dim=1)
            valid = torch.cat([torch.ones_like(target_valid[:, :1]), target_valid], dim=1)
            hidden = self.bert(input_ids, attention_mask, token_type_ids, positions, valid)
            cls_hidden, hidden = hidden[:, 0], hidden[:, 1:]
        else:
            hidden = self.bert(input_ids, attention_mask, token_type_ids, target_positions, target_valid)
        logits = self.cls.predictions(hidden)  # (B, M, V/tp)
        losses = vocab_parallel_cross_entropy(logits, target_ids, self.groups.tensor) * target_valid
        denominator = target_valid.sum().clamp(min=1) if num_targets is None else num_targets
        loss = losses.sum() / denominator
        pair_logits = None
        if self.cls.seq_relationship is not None:
            pair_logits = self.cls.seq_relationship(self.bert.pooler(cls_hidden))
            if pair_label is not None:
                loss = loss + nn.functional.cross_entropy(pair_logits, pair_label.view(-1))
        return PretrainingOutput(loss=loss, target_losses=losses.detach(), logits=logits, pair_logits=pair_logits)

    @torch.no_grad()
    def update_importance(self, target_ids: torch.Tensor, target_losses: torch.Tensor,
                          target_valid: torch.Tensor, *, end_of_step: bool = True) -> None:
        """token_drop: fold per-target losses into the importance vector (no-op for other variants).

        With gradient accumulation, call it for every micro-batch and pass end_of_step on the last one:
        the vector then moves once per optimizer step, by the whole global batch."""
        importance = self.bert.token_importance
        if importance is not None:
            importance.accumulate(target_ids, target_losses, target_valid)
            if end_of_step:
                importance.apply(self.groups.data)


class BertForSequenceClassification(nn.Module):
    """Pooled [CLS] -> labels. narrow runs its narrow layers for [CLS] only."""

    def __init__(self, config: ModelConfig, num_labels: int, groups: ProcessGroups | None = None,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(config.init_seed)
        self.bert = BertModel(config, groups, add_pooler=True, tracker=tracker, generator=generator)
        self.head = ClassificationHead(config, num_labels, generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        cls_position = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, cls_position)  # (B, 1, H)
        return self.head(self.bert.pooler(hidden[:, 0]))


class BertForTokenClassification(nn.Module):
    """Token states -> labels at the requested positions (narrow computes only those)."""

    def __init__(self, config: ModelConfig, num_labels: int, groups: ProcessGroups | None = None,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(config.init_seed)
        self.bert = BertModel(config, groups, tracker=tracker, generator=generator)
        self.head = ClassificationHead(config, num_labels, generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q, num_labels) at positions (B, Q), or at every position when None."""
        return self.head(self.bert(input_ids, attention_mask, token_type_ids, positions))
