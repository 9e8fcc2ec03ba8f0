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
from megatron_narrow.parallel import (
    GroupInfo,
    ProcessGroups,
    RNGStatesTracker,
    component_generator,
    vocab_parallel_cross_entropy,
)
from megatron_narrow.variants import drops_tokens

DEFAULT_SPECIAL_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}  # BERT's WordPiece ids


def build_token_importance(config: ModelConfig, special_ids: dict[str, int] | None) -> TokenImportance | None:
    """The importance vector of a variant that drops tokens (None for the others)."""
    if not drops_tokens(config):
        return None
    special = special_ids or DEFAULT_SPECIAL_IDS
    return TokenImportance(config.vocab_size, special_ids=tuple(special.values()), pad_id=special["pad"],
                           init=config.importance_init, beta=config.importance_beta,
                           force_targets=config.token_drop_force_keep == "targets")


class BertModel(nn.Module):
    """Embeddings + encoder (+ pooler). `forward` returns hidden states at the query positions."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups | None = None, *, add_pooler: bool = False,
                 tracker: RNGStatesTracker | None = None, special_ids: dict[str, int] | None = None) -> None:
        super().__init__()
        groups = groups or ProcessGroups.single()
        config.validate(tensor_parallel=groups.tensor.size)
        self.config = config
        self.groups = groups
        self.embeddings = BertEmbeddings(config, groups, component_generator(config.init_seed, "embeddings"))
        self.encoder = BertEncoder(config, groups, tracker)
        self.pooler = BertPooler(config, component_generator(config.init_seed, "pooler")) if add_pooler else None
        self.token_importance = build_token_importance(config, special_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, query_positions: torch.Tensor | None = None,
                query_valid: torch.Tensor | None = None, *, segment_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids -> (B, Q, H) at query_positions (B, Q), or (B, S, H) when None.

        narrow computes its last layers only for the query positions; token_drop also forces them
        (where query_valid) into the kept set. segment_ids/position_ids: packed rows (data.packing=segments).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.encoder(hidden, attention_mask, query_positions, importance=self.token_importance,
                            input_ids=input_ids, forced_valid=query_valid, segment_ids=segment_ids)


@dataclass
class PretrainingOutput:
    loss: torch.Tensor
    """Mean MLM loss over valid targets (+ the pair-task loss, when there is one)."""
    target_losses: torch.Tensor
    """(B, M) per-target MLM loss (0 where invalid): feeds the token-drop importance update."""
    logits: torch.Tensor
    """(B, M, V_padded / tp) this rank's shard of the MLM logits at the target positions."""
    pair_logits: torch.Tensor | None = None


def with_cls_query(positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend position 0 ([CLS], always valid) to the query positions: the pair head's pooler needs it."""
    return (torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1),
            torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1))


def pretraining_logits(hidden: torch.Tensor, decoder_weight: torch.Tensor, predictions: BertLMPredictionHead,
                       pooler: BertPooler | None, seq_relationship: nn.Linear | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states at the queries -> (MLM logits (B, M, V/tp), pair logits (B, 2) or None). With a pair
    head the first query is [CLS] (see with_cls_query)."""
    if seq_relationship is None:
        return predictions(hidden, decoder_weight), None
    return predictions(hidden[:, 1:], decoder_weight), seq_relationship(pooler(hidden[:, 0]))


def pretraining_loss(logits: torch.Tensor, pair_logits: torch.Tensor | None, target_ids: torch.Tensor,
                     target_valid: torch.Tensor, group: GroupInfo, *, pair_label: torch.Tensor | None = None,
                     num_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-target MLM losses (B, M), 0 where invalid). `num_targets` replaces the batch's valid-target
    count as the MLM loss's denominator (see BertForPreTraining.forward)."""
    losses = vocab_parallel_cross_entropy(logits, target_ids, group) * target_valid
    denominator = target_valid.sum().clamp(min=1) if num_targets is None else num_targets
    loss = losses.sum() / denominator
    if pair_logits is not None and pair_label is not None:
        loss = loss + nn.functional.cross_entropy(pair_logits, pair_label.view(-1))
    return loss, losses


class BertForPreTraining(nn.Module):
    """MLM (sparse: only target rows reach the head) and an optional NSP/SOP head on the pooled [CLS]."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups | None = None, *, pair_head: bool = False,
                 tracker: RNGStatesTracker | None = None, special_ids: dict[str, int] | None = None) -> None:
        super().__init__()
        groups = groups or ProcessGroups.single()
        self.bert = BertModel(config, groups, add_pooler=pair_head, tracker=tracker, special_ids=special_ids)
        self.cls = nn.Module()
        self.cls.predictions = BertLMPredictionHead(config, groups.tensor,
                                                    component_generator(config.init_seed, "lm_head"))
        self.cls.seq_relationship = build_pair_classifier(config) if pair_head else None
        self.groups = groups

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                target_positions: torch.Tensor, target_ids: torch.Tensor, target_valid: torch.Tensor,
                pair_label: torch.Tensor | None = None, num_targets: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> PretrainingOutput:
        """MLM (+ pair) loss. `num_targets` replaces this batch's valid-target count as the MLM loss's
        denominator: the training loop passes the global batch's count (per rank and micro-batch), so
        that data parallelism and gradient accumulation reproduce one big batch exactly. segment_ids and
        position_ids come with packed segments (data.packing=segments)."""
        positions, valid = target_positions, target_valid
        if self.cls.seq_relationship is not None:
            positions, valid = with_cls_query(positions, valid)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, positions, valid, segment_ids=segment_ids,
                           position_ids=position_ids)
        logits, pair_logits = pretraining_logits(hidden, self.bert.embeddings.word_embeddings.weight,
                                                 self.cls.predictions, self.bert.pooler, self.cls.seq_relationship)
        loss, losses = pretraining_loss(logits, pair_logits, target_ids, target_valid, self.groups.tensor,
                                        pair_label=pair_label, num_targets=num_targets)
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


def build_pair_classifier(config: ModelConfig) -> nn.Linear:
    """The NSP/SOP classifier on the pooled [CLS] (cls.seq_relationship)."""
    return _linear(config.hidden_size, 2, config.initializer_range, component_generator(config.init_seed, "pair_head"))


class BertForSequenceClassification(nn.Module):
    """Pooled [CLS] -> labels. narrow runs its narrow layers for [CLS] only."""

    def __init__(self, config: ModelConfig, num_labels: int, groups: ProcessGroups | None = None,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        self.bert = BertModel(config, groups, add_pooler=True, tracker=tracker)
        self.head = ClassificationHead(config, num_labels, component_generator(config.init_seed, "classifier"))

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
        self.bert = BertModel(config, groups, tracker=tracker)
        self.head = ClassificationHead(config, num_labels, component_generator(config.init_seed, "classifier"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q, num_labels) at positions (B, Q), or at every position when None."""
        return self.head(self.bert(input_ids, attention_mask, token_type_ids, positions))
