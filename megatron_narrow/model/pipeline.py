"""BertForPreTraining as a DeepSpeed pipeline: the items, the fixed-shape tuples between them, where the
stages are cut, and which model parameter each item's parameter is.

Items, in order (DeepSpeed runs them like nn.Sequential; each stage holds a contiguous range):
    0       EmbeddingPipe         tied "word_embeddings": data inputs -> the encoder state before layer 0
    1..L    EncoderLayerPipe(i)   one BertLayer, run by the variant's schedule (encoder.run_layers)
    L+1     TiedDecoderPipe       the last stage's tied copy of the word embeddings: hands the decoder
                                  weight to the head
    L+2     PretrainingHeadPipe   MLM head (+ pooler and pair classifier) -> logits
The loss (PretrainingPipeLoss) runs on the last stage and keeps each micro-batch's per-target losses for
the loop: the logged loss and token dropping's importance update need them.

Between items the EncoderState travels as a tuple of the fields `state_fields` names for that point:
float activations, for which DeepSpeed sends gradients back, and int64/bool positions and masks, for
which it does not. Every shape is fixed by (micro-batch, seq_len, max_predictions, k), as DeepSpeed's
pipeline engine needs.

Every item draws its initial weights from its own generator (parallel.component_generator), so a
pipeline starts from exactly the weights of the single-process model with the same init_seed.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.bert import (
    build_pair_classifier,
    build_token_importance,
    pretraining_logits,
    pretraining_loss,
    with_cls_query,
)
from megatron_narrow.model.costs import pipeline_layer_costs
from megatron_narrow.model.embeddings import BertEmbeddings
from megatron_narrow.model.encoder import EncoderState, run_layers, state_fields, transition_layer
from megatron_narrow.model.heads import BertLMPredictionHead, BertPooler
from megatron_narrow.model.layer import BertLayer
from megatron_narrow.model.partition import balanced_partition, uniform_partition
from megatron_narrow.model.token_drop import TokenImportance
from megatron_narrow.parallel import (
    GroupInfo,
    ProcessGroups,
    RNGStatesTracker,
    VocabParallelEmbedding,
    component_generator,
)

TIE_KEY = "word_embeddings"


def pack(state: EncoderState, fields: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    values = tuple(getattr(state, name) for name in fields)
    missing = [name for name, value in zip(fields, values, strict=True) if value is None]
    if missing:
        raise RuntimeError(f"pipeline state lacks {missing} (expected {fields})")
    return values


def unpack(inputs: torch.Tensor | tuple[torch.Tensor, ...], fields: tuple[str, ...]) -> EncoderState:
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    return EncoderState(**dict(zip(fields, inputs, strict=True)))


def pipeline_inputs(batch: dict[str, torch.Tensor], pair_head: bool) -> tuple[torch.Tensor, ...]:
    """The first stage's inputs from a pretraining batch: ids, mask, types, query positions and validity
    (+ segment and position ids of packed segments)."""
    positions, valid = batch["target_positions"], batch["target_valid"]
    if pair_head:
        positions, valid = with_cls_query(positions, valid)
    inputs = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], positions, valid
    return (*inputs, batch["segment_ids"], batch["position_ids"]) if "segment_ids" in batch else inputs


def pipeline_labels(batch: dict[str, torch.Tensor], num_targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The last stage's labels: target ids and validity, the loss denominator, and the pair label if any."""
    labels = (batch["target_ids"], batch["target_valid"], num_targets.reshape(()))
    return (*labels, batch["pair_label"]) if "pair_label" in batch else labels


class EmbeddingPipe(BertEmbeddings):
    """Item 0 (tied): (ids, mask, types, query positions, query valid[, segment ids, position ids]) -> the
    state before layer 0."""

    def __init__(self, config: ModelConfig, *, groups: ProcessGroups, segments: bool = False) -> None:
        super().__init__(config, groups, component_generator(config.init_seed, "embeddings"))
        self.config, self.segments = config, segments

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask, token_type_ids, positions, valid, *packed = inputs
        segment_ids, position_ids = packed if self.segments else (None, None)
        state = EncoderState(hidden=super().forward(input_ids, token_type_ids, position_ids),
                             key_mask=attention_mask.bool(), query_positions=positions, query_valid=valid.bool(),
                             input_ids=input_ids, segment_ids=segment_ids)
        return pack(state, state_fields(self.config, 0, self.segments))


class EncoderLayerPipe(nn.Module):
    """Item 1 + index: one encoder layer; token_drop's transition layer also holds the importance vector."""

    def __init__(self, config: ModelConfig, index: int, *, groups: ProcessGroups,
                 tracker: RNGStatesTracker | None = None, special_ids: dict[str, int] | None = None,
                 segments: bool = False) -> None:
        super().__init__()
        self.config, self.index, self.segments = config, index, segments
        self.layer = BertLayer(config, groups, component_generator(config.init_seed, f"layer.{index}"), tracker)
        picks_kept = index == transition_layer(config)
        self.token_importance = build_token_importance(config, special_ids) if picks_kept else None

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        state = unpack(inputs, state_fields(self.config, self.index, self.segments))
        state = run_layers(self.config, [(self.index, self.layer)], state, importance=self.token_importance)
        return pack(state, state_fields(self.config, self.index + 1, self.segments))


class TiedDecoderPipe(nn.Module):
    """Item L+1 (tied): the last stage's copy of the word-embedding table, kept equal to stage 0's by
    DeepSpeed (broadcast at start, gradients all-reduced every step). Its forward hands the table to
    the head as the MLM decoder weight."""

    def __init__(self, config: ModelConfig, *, groups: ProcessGroups) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, group=groups.tensor, init_std=config.initializer_range,
            generator=component_generator(config.init_seed, "embeddings"))


def hand_over_decoder(decoder: TiedDecoderPipe, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    (hidden,) = inputs
    return hidden, decoder.word_embeddings.weight


class PretrainingHeadPipe(nn.Module):
    """Item L+2: (hidden at the queries, decoder weight) -> (MLM logits[, pair logits])."""

    def __init__(self, config: ModelConfig, *, groups: ProcessGroups, pair_head: bool = False) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, groups.tensor,
                                                component_generator(config.init_seed, "lm_head"))
        self.pooler = BertPooler(config, component_generator(config.init_seed, "pooler")) if pair_head else None
        self.seq_relationship = build_pair_classifier(config) if pair_head else None

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, decoder_weight = inputs
        logits, pair_logits = pretraining_logits(hidden, decoder_weight, self.predictions, self.pooler,
                                                 self.seq_relationship)
        return (logits,) if pair_logits is None else (logits, pair_logits)


class PretrainingPipeLoss:
    """The pipeline's loss_fn(outputs, labels) on the last stage; the same loss as BertForPreTraining.
    Keeps each micro-batch's (target ids, per-target losses, validity) until the loop takes them."""

    def __init__(self, group: GroupInfo) -> None:
        self.group = group
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.finite = True

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits, pair_logits = outputs[0], (outputs[1] if len(outputs) > 1 else None)
        target_ids, target_valid, num_targets, *pair_label = labels
        loss, losses = pretraining_loss(logits, pair_logits, target_ids, target_valid, self.group,
                                        pair_label=pair_label[0] if pair_label else None, num_targets=num_targets)
        self.records.append((target_ids, losses.detach(), target_valid))
        self.finite = self.finite and bool(torch.isfinite(loss.detach()))  # the pair loss included
        return loss

    def take(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bool]:
        """(records since the last take, whether every loss since then was finite)."""
        records, finite, self.records, self.finite = self.records, self.finite, [], True
        return records, finite


def stage_boundaries(config: ModelConfig, num_stages: int, method: str, *, seq_len: int,
                     num_queries: int) -> list[int]:
    """DeepSpeed's `parts` over the items: stage s runs items parts[s]..parts[s+1]-1. The encoder layers
    are split by count ("uniform") or by estimated FLOPs ("cost", the head's counted with the last
    layer); the embeddings go with the first stage, decoder and head with the last."""
    num_layers = config.num_layers
    if method == "uniform":
        layer_parts = uniform_partition(num_layers, num_stages)
    elif method == "cost":
        layer_parts = balanced_partition(pipeline_layer_costs(config, seq_len, num_queries), num_stages)
    else:
        raise ValueError(f"pipeline partition must be uniform or cost, got {method!r}")
    return [0, *(1 + cut for cut in layer_parts[1:-1]), num_layers + 3]


def model_key(config: ModelConfig, item: int, key: str) -> str:
    """The BertForPreTraining name of parameter/buffer `key` of pipeline item `item`."""
    num_layers = config.num_layers
    if item == 0:
        return "bert.embeddings." + key
    if 1 <= item <= num_layers:
        if key.startswith("token_importance."):
            return "bert." + key
        return f"bert.encoder.layer.{item - 1}." + key.removeprefix("layer.")
    if item == num_layers + 1:
        return "bert.embeddings." + key
    if item == num_layers + 2:
        if key.startswith("pooler."):
            return "bert." + key
        return "cls." + key
    raise ValueError(f"item {item} is outside the {num_layers + 3} items of this pipeline")


class BertPipeline(PipelineModule):
    """The pretraining model for parallel.pipeline_parallel > 1 (see the module docstring).

    The grid DeepSpeed builds from `topology` (axes pipe, data, model: Megatron's rank order) is also
    where the parallel layers get their groups (ProcessGroups.from_grid), so tensor-parallel
    collectives, DeepSpeed's gradient all-reduce and the tied-weight all-reduce agree on who is who.
    """

    def __init__(self, config: ModelConfig, topology, *, seq_len: int, num_queries: int, partition: str = "cost",
                 pair_head: bool = False, tracker: RNGStatesTracker | None = None,
                 special_ids: dict[str, int] | None = None, segments: bool = False) -> None:
        """segments: the batches are packed segments (segment and position ids travel with the state)."""
        config.validate(tensor_parallel=topology.get_dim("model"))
        self.config = config
        self.pair_head = pair_head
        self._partition_args = dict(seq_len=seq_len, num_queries=num_queries)
        specs = [TiedLayerSpec(TIE_KEY, EmbeddingPipe, config, tied_weight_attr=["word_embeddings.weight"],
                               segments=segments),
                 *(LayerSpec(EncoderLayerPipe, config, i, tracker=tracker, special_ids=special_ids, segments=segments)
                   for i in range(config.num_layers)),
                 TiedLayerSpec(TIE_KEY, TiedDecoderPipe, config, forward_fn=hand_over_decoder,
                               tied_weight_attr=["word_embeddings.weight"]),
                 LayerSpec(PretrainingHeadPipe, config, pair_head=pair_head)]
        super().__init__(layers=specs, topology=topology, partition_method=partition)

    def _partition_layers(self, method: str = "cost") -> None:
        """DeepSpeed's hook for `parts`: ours keeps the embeddings first and decoder + head last."""
        self.parts = stage_boundaries(self.config, self.num_stages, method, **self._partition_args)
        self.partition_method = method
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def describe_partition(self) -> str:
        """Which items each stage holds, in one line for the run's log."""
        spans = ", ".join(f"stage {s}: items {self.parts[s]}-{self.parts[s + 1] - 1}" for s in range(self.num_stages))
        layers = self.config.num_layers
        return (f"pipeline partition ({self.partition_method}): {spans} (0 embeddings, 1-{layers} layers, "
                f"{layers + 1}-{layers + 2} decoder and head)")

    def _build(self) -> None:
        """Build this stage's items with the grid's groups (they exist only now), then the loss."""
        self.groups = ProcessGroups.from_grid(self._grid)
        for spec in self._layer_specs:
            spec.module_kwargs["groups"] = self.groups
        super()._build()
        self.loss_fn = PretrainingPipeLoss(self.groups.tensor)

    def _synchronize_tied_weights(self) -> None:
        """DeepSpeed's broadcast of the tied weights (at start and after loading), outside autograd: run on
        parameters that require grad, it would leave a c10d node for backward to warn about."""
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def items(self) -> list[tuple[int, nn.Module]]:
        """(item index, module) of this stage's items; tied items give their tied module."""
        out = []
        for offset, spec in enumerate(self._layer_specs[self._local_start:self._local_stop]):
            item = self._local_start + offset
            tied = isinstance(spec, TiedLayerSpec)
            out.append((item, self.tied_modules[spec.key] if tied else getattr(self, str(item))))
        return out

    def token_importance(self) -> TokenImportance | None:
        """token_drop: the importance vector, on the stage that holds the transition layer."""
        return next((m for m in self.modules() if isinstance(m, TokenImportance)), None)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's parameters and buffers under BertForPreTraining's names."""
        return {model_key(self.config, item, key): value for item, module in self.items()
                for key, value in module.state_dict().items()}
