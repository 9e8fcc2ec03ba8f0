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
    linear_cross_entropy,
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
    logits: torch.Tensor | None
    """(B, M, V_padded / tp) this rank's shard of the MLM logits at the target positions; None where the
    single-rank training forward never made them (see BertForPreTraining.forward's return_logits)."""
    pair_logits: torch.Tensor | None = None


def with_cls_query(positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend position 0 ([CLS], always valid) to the query positions: the pair head's pooler needs it."""
    return (torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1),
            torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1))


def split_pair_query(hidden: torch.Tensor, pooler: BertPooler | None, seq_relationship: nn.Linear | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states at the queries -> (the MLM targets' states, pair logits (B, 2) or None). With a pair
    head the first query is [CLS] (see with_cls_query)."""
    if seq_relationship is None:
        return hidden, None
    return hidden[:, 1:], seq_relationship(pooler(hidden[:, 0]))


def pretraining_logits(hidden: torch.Tensor, decoder_weight: torch.Tensor, predictions: BertLMPredictionHead,
                       pooler: BertPooler | None, seq_relationship: nn.Linear | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states at the queries -> (MLM logits (B, M, V/tp), pair logits (B, 2) or None)."""
    targets, pair_logits = split_pair_query(hidden, pooler, seq_relationship)
    return predictions(targets, decoder_weight), pair_logits


def _mlm_denominator(target_valid: torch.Tensor, num_targets: torch.Tensor | None) -> torch.Tensor:
    return target_valid.sum().clamp(min=1) if num_targets is None else num_targets


def _with_pair_loss(loss: torch.Tensor, pair_logits: torch.Tensor | None,
                    pair_label: torch.Tensor | None) -> torch.Tensor:
    if pair_logits is None or pair_label is None:
        return loss
    return loss + nn.functional.cross_entropy(pair_logits, pair_label.view(-1))


def pretraining_loss(logits: torch.Tensor, pair_logits: torch.Tensor | None, target_ids: torch.Tensor,
                     target_valid: torch.Tensor, group: GroupInfo, *, pair_label: torch.Tensor | None = None,
                     num_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-target MLM losses (B, M), 0 where invalid). `num_targets` replaces the batch's valid-target
    count as the MLM loss's denominator (see BertForPreTraining.forward)."""
    losses = vocab_parallel_cross_entropy(logits, target_ids, group) * target_valid
    loss = losses.sum() / _mlm_denominator(target_valid, num_targets)
    return _with_pair_loss(loss, pair_logits, pair_label), losses


def fused_pretraining_loss(hidden: torch.Tensor, decoder_weight: torch.Tensor, predictions: BertLMPredictionHead,
                           pooler: BertPooler | None, seq_relationship: nn.Linear | None, target_ids: torch.Tensor,
                           target_valid: torch.Tensor, *, pair_label: torch.Tensor | None = None,
                           num_targets: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """pretraining_logits + pretraining_loss on a single rank without the logits: (loss, per-target losses,
    pair logits). The decoder GEMM, the loss and its gradients are made a chunk of rows at a time
    (parallel/cross_entropy.py: linear_cross_entropy); equal to the two-step path up to float rounding."""
    targets, pair_logits = split_pair_query(hidden, pooler, seq_relationship)
    loss, losses = linear_cross_entropy(predictions.transform(targets), decoder_weight, predictions.decoder_bias(),
                                        target_ids, target_valid, _mlm_denominator(target_valid, num_targets))
    return _with_pair_loss(loss, pair_logits, pair_label), losses, pair_logits


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
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_logits: bool = False) -> PretrainingOutput:
        """MLM (+ pair) loss. `num_targets` replaces this batch's valid-target count as the MLM loss's
        denominator: the training loop passes the global batch's count (per rank and micro-batch), so
        that data parallelism and gradient accumulation reproduce one big batch exactly. segment_ids and
        position_ids come with packed segments (data.packing=segments).

        On a single rank with gradients enabled the loss is fused with the decoder GEMM and the logits are
        never made (fused_pretraining_loss); `return_logits` asks for the two-step path and the logits.
        Without gradients, tensor-parallel or in fp16 (whose unscaled gradients would underflow before the
        loss scale reaches them), logits come back."""
        positions, valid = target_positions, target_valid
        if self.cls.seq_relationship is not None:
            positions, valid = with_cls_query(positions, valid)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, positions, valid, segment_ids=segment_ids,
                           position_ids=position_ids)
        decoder_weight = self.bert.embeddings.word_embeddings.weight
        heads = (decoder_weight, self.cls.predictions, self.bert.pooler, self.cls.seq_relationship)
        fused = (self.groups.tensor.size == 1 and torch.is_grad_enabled() and not return_logits
                 and decoder_weight.dtype != torch.float16  # fp16's loss scale must reach the gradient first
                 and not torch.compiler.is_compiling())  # inductor fuses the two-step path its own way
        if fused:
            logits = None
            loss, losses, pair_logits = fused_pretraining_loss(hidden, *heads, target_ids, target_valid,
                                                               pair_label=pair_label, num_targets=num_targets)
        else:
            logits, pair_logits = pretraining_logits(hidden, *heads)
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
