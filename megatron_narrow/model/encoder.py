"""The encoder: one stack of BertLayers and the three ways of running it, written once as a walk over
layers that carries an `EncoderState`. The single-process model walks all layers; a pipeline stage walks
its own (model/pipeline.py), with the state packed into fixed-shape tensors between stages.

- bert:       every layer on every position; outputs are gathered at the query positions at the end.
- narrow:     `full_length_layers` ordinary layers give the context C; every narrow layer computes
              queries for the query positions only, keys/values from C (projected together for the
              narrow layers of one walk).
- token_drop: layers 0..L/2-2 on all tokens; layer L/2-1 (transition) queries the kept tokens against
              all; layers L/2..L-2 on kept tokens only; the dropped tokens' states wait and are scattered
              back before layer L-1, which runs on all positions.

Packed segments (data.packing=segments) carry `segment_ids`; every attention then takes an AttentionMask of
query and key segments (model/attention_mask.py) so that each row (a full position, a narrow query, a kept
token) sees only the keys of its own segment: dense kernels read it as a per-query mask, `varlen` computes
each segment alone. Without segment ids the key mask is used as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.attention import few_queries, split_heads
from megatron_narrow.model.attention_mask import AttentionMask
from megatron_narrow.model.layer import BertLayer
from megatron_narrow.model.token_drop import TokenImportance
from megatron_narrow.parallel import (
    ProcessGroups,
    RNGStatesTracker,
    column_parallel_projections,
    component_generator,
)
from megatron_narrow.variants import drops_tokens, layer_roles


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, S, H) at (B, Q) positions -> (B, Q, H)"""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@dataclass
class EncoderState:
    """What one layer hands the next; between pipeline stages, its present fields as a tuple (see
    `state_fields`)."""

    hidden: torch.Tensor
    """The rows being computed: (B, S, H); narrow queries (B, Q, H); token_drop kept rows (B, k, H)."""
    key_mask: torch.Tensor
    """(B, S) bool, True at real tokens."""
    query_positions: torch.Tensor | None = None
    """(B, Q) positions whose outputs are wanted (None: every position)."""
    query_valid: torch.Tensor | None = None
    """token_drop, up to the transition: (B, Q) bool, query positions forced into the kept set."""
    input_ids: torch.Tensor | None = None
    """token_drop, up to the transition: (B, S) ids, whose importance picks the kept tokens."""
    context: torch.Tensor | None = None
    """narrow: C (B, S, H), the keys/values source of every narrow layer. token_drop, after the
    transition: the full-length states (B, S, H) that wait for the dropped tokens."""
    kept: torch.Tensor | None = None
    """token_drop, after the transition: (B, k) kept positions, in order."""
    kept_mask: torch.Tensor | None = None
    """token_drop, after the transition: (B, k) bool, which kept positions are real tokens."""
    segment_ids: torch.Tensor | None = None
    """Packed segments: (B, S) int, 1, 2, ... per segment, 0 on padding (None: one sample per row)."""
    query_segments: torch.Tensor | None = None
    """narrow with packed segments, after the full-length layers: (B, Q) segment of each query row."""


def transition_layer(config: ModelConfig) -> int | None:
    """The layer whose queries are the kept tokens (token dropping), or None."""
    roles = layer_roles(config)
    return roles.index("transition") if "transition" in roles else None


def state_fields(config: ModelConfig, index: int, segments: bool = False) -> tuple[str, ...]:
    """The EncoderState fields present before layer `index` (index == num_layers: the encoder's output,
    hidden states at the query positions), for a walk that has query positions; `segments`: packed rows.
    Read from the layer roles (variants.py): what the layers before `index` have done decides it."""
    if index >= config.num_layers:
        return ("hidden",)
    done = set(layer_roles(config)[:index])
    if "narrow" in done:  # the context C is fixed and the rows are the queries
        fields = ("hidden", "key_mask", "context")
        return (*fields, "segment_ids", "query_segments") if segments else fields
    fields = ("hidden", "key_mask", "query_positions")
    if "transition" in done:  # the dropped tokens wait in `context`
        fields += ("context", "kept", "kept_mask")
    elif drops_tokens(config):  # the kept set is still to be chosen
        fields += ("query_valid", "input_ids")
    return (*fields, "segment_ids") if segments else fields


def narrow_kv(layers: list[BertLayer], context: torch.Tensor, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (B, h/tp, S, d) of each narrow layer from C, projected together: C enters the
    tensor-parallel region once for all of them (one gradient all-reduce in backward)."""
    projections = [p for layer in layers for p in (layer.attention.self.key, layer.attention.self.value)]
    outputs = [split_heads(t, head_dim) for t in column_parallel_projections(context, projections)]
    return list(zip(outputs[0::2], outputs[1::2], strict=True))


def run_layers(config: ModelConfig, layers: Iterable[tuple[int, BertLayer]], state: EncoderState, *,
               importance: TokenImportance | None = None) -> EncoderState:
    """Run (index, layer) pairs, consecutive, on `state` (updated in place and returned)."""
    layers = list(layers)
    num_layers, roles = config.num_layers, layer_roles(config)
    segments = state.segment_ids
    # unpacked: every query of a row may attend the row's real keys; packed: those of its own segment
    full_mask = AttentionMask.of(state.key_mask) if segments is None else AttentionMask(segments, segments)
    narrow_mask = kept_attention = None  # built at the first layer that needs them, then shared
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, layer in layers:
        role = roles[index]
        if role == "narrow":
            if state.context is None:  # the first narrow layer: C is fixed from here on
                state.context = state.hidden
                if state.query_positions is not None:
                    state.hidden = gather_positions(state.context, state.query_positions)
                if segments is not None:
                    state.query_segments = segments if state.query_positions is None else \
                        segments.gather(1, state.query_positions)
                state.query_positions = None
            if narrow_mask is None:
                narrow_mask = full_mask if segments is None else AttentionMask(segments, state.query_segments)
            if few_queries(state.hidden.shape[1], config.head_dim):  # e.g. [CLS] only: no K/V for all positions
                state.hidden = layer(state.hidden, narrow_mask, context=state.context, through_weights=True)
            else:
                if index not in kv:
                    rest = [(i, lay) for i, lay in layers if i >= index]
                    projected = narrow_kv([lay for _, lay in rest], state.context, config.head_dim)
                    kv = {i: pair for (i, _), pair in zip(rest, projected, strict=True)}
                state.hidden = layer(state.hidden, narrow_mask, kv=kv[index])
        elif role == "transition":
            _drop_tokens(config, layer, state, importance)
        elif role == "kept":
            if kept_attention is None:
                kept_segments = None if segments is None else segments.gather(1, state.kept)
                kept_attention = AttentionMask.of(state.kept_mask) if segments is None else \
                    AttentionMask(kept_segments, kept_segments)
            state.hidden = layer(state.hidden, kept_attention)
        elif role == "rejoin":
            index_rows = state.kept.unsqueeze(-1).expand(-1, -1, state.hidden.shape[-1])
            restored = state.context.scatter(1, index_rows, state.hidden)  # the dropped tokens rejoin
            state.context = state.kept = state.kept_mask = None
            state.hidden = layer(restored, full_mask)
        else:
            state.hidden = layer(state.hidden, full_mask)
        if index == num_layers - 1 and state.query_positions is not None:
            state.hidden = gather_positions(state.hidden, state.query_positions)
            state.query_positions = None
    return state


def _drop_tokens(config: ModelConfig, layer: BertLayer, state: EncoderState,
                 importance: TokenImportance | None) -> None:
    """The transition layer: pick the kept tokens, let them attend to all (of their own segment, when
    packed), and park the full states."""
    if importance is None or state.input_ids is None:
        raise ValueError(f"variant={config.variant} drops tokens: it needs the importance vector and the input ids")
    k = config.kept_tokens(state.hidden.shape[1])
    kept, kept_mask = importance.select(state.input_ids, state.key_mask, state.query_positions, state.query_valid, k)
    mask = AttentionMask.of(state.key_mask)
    if state.segment_ids is not None:
        mask = AttentionMask(state.segment_ids, state.segment_ids.gather(1, kept))
    state.context = state.hidden  # the dropped tokens' states wait here unchanged
    state.hidden = layer(gather_positions(state.hidden, kept), mask, context=state.hidden,
                         through_weights=few_queries(kept.shape[1], config.head_dim))
    state.kept, state.kept_mask = kept, kept_mask
    state.input_ids = state.query_valid = None


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig, groups: ProcessGroups, tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(BertLayer(config, groups, component_generator(config.init_seed, f"layer.{i}"),
                                             tracker) for i in range(config.num_layers))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, query_positions: torch.Tensor | None,
                *, importance: TokenImportance | None = None, input_ids: torch.Tensor | None = None,
                forced_valid: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, S, H) embeddings -> (B, Q, H) at query_positions (B, Q), or (B, S, H) if None."""
        state = EncoderState(hidden=hidden, key_mask=attention_mask.bool(), query_positions=query_positions,
                             query_valid=forced_valid, input_ids=input_ids, segment_ids=segment_ids)
        return run_layers(self.config, enumerate(self.layer), state, importance=importance).hidden
