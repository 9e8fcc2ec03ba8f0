"""The encoder: one stack of BertLayers, and the three ways of running it, each visible in one place.

- bert:       every layer on every position; outputs are gathered at the query positions at the end.
- narrow:     `full_length_layers` ordinary layers give the context C; every narrow layer computes
              queries for the query positions only, keys/values from C (one GEMM for all narrow layers).
- token_drop: layers 0..L/2-2 on all tokens; layer L/2-1 (transition) queries the kept tokens against
              all; layers L/2..L-2 on kept tokens only; the dropped tokens' states wait and are scattered
              back before layer L-1, which runs on all positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.attention import split_heads
from megatron_narrow.model.layer import BertLayer
from megatron_narrow.model.token_drop import TokenImportance
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker
from megatron_narrow.parallel.mappings import copy_to_tensor_region


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, S, H) at (B, Q) positions -> (B, Q, H)"""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


CPU_GEMM_OUTPUT_BYTES = 30 << 20


def _kv_groups(narrow: nn.ModuleList, context: torch.Tensor) -> list[list[nn.Module]]:
    """Narrow layers whose K/V share one GEMM: all of them on CUDA (the caching allocator reuses the
    output block); on the CPU as many as keep the output under ~30 MiB, because glibc hands larger
    blocks back to the OS on free and every forward would fault in fresh pages (measured: 13% of a
    NarrowBERT classification forward at batch 4 x 512, hidden 256)."""
    layers = list(narrow)
    if context.is_cuda:
        return [layers]
    b, s, _ = context.shape
    per_layer = b * s * 2 * layers[0].attention.self.key.weight.shape[0] * context.element_size()
    size = max(1, CPU_GEMM_OUTPUT_BYTES // per_layer)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig, groups: ProcessGroups, generator: torch.Generator,
                 tracker: RNGStatesTracker | None = None) -> None:
        super().__init__()
        self.config = config
        self.group = groups.tensor
        self.layer = nn.ModuleList(BertLayer(config, groups, generator, tracker) for _ in range(config.num_layers))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, query_positions: torch.Tensor | None,
                *, importance: TokenImportance | None = None, input_ids: torch.Tensor | None = None,
                forced_valid: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, S, H) embeddings -> (B, Q, H) at query_positions (B, Q), or (B, S, H) if None."""
        key_mask = attention_mask.bool()
        variant = self.config.variant
        if variant == "narrow":
            return self._narrow(hidden, key_mask, query_positions)
        if variant == "token_drop":
            hidden = self._token_drop(hidden, key_mask, importance, input_ids, query_positions, forced_valid)
        else:
            for layer in self.layer:
                hidden = layer(hidden, key_mask)
        return hidden if query_positions is None else gather_positions(hidden, query_positions)

    def _narrow(self, hidden: torch.Tensor, key_mask: torch.Tensor,
                query_positions: torch.Tensor | None) -> torch.Tensor:
        full = self.config.full_length_layers
        for layer in self.layer[:full]:
            hidden = layer(hidden, key_mask)
        context = hidden  # C: fixed from here on
        queries = context if query_positions is None else gather_positions(context, query_positions)
        narrow = self.layer[full:]
        if not len(narrow):
            return queries
        head_dim = self.config.head_dim
        kv_per_layer = []
        for group in _kv_groups(narrow, context):
            # K/V of a group of narrow layers from C in one GEMM: (B, S, H) x (H, n * 2H/tp)
            weights, biases = zip(*(layer.attention.self.kv_weight() for layer in group), strict=True)
            kv = F.linear(copy_to_tensor_region(context, self.group), torch.cat(weights), torch.cat(biases))
            kv_per_layer.extend(kv.chunk(len(group), dim=-1))
        for layer, kv in zip(narrow, kv_per_layer, strict=True):
            k, v = kv.chunk(2, dim=-1)
            queries = layer(queries, key_mask, kv=(split_heads(k, head_dim), split_heads(v, head_dim)))
        return queries

    def _token_drop(self, hidden: torch.Tensor, key_mask: torch.Tensor, importance: TokenImportance | None,
                    input_ids: torch.Tensor | None, forced_positions: torch.Tensor | None,
                    forced_valid: torch.Tensor | None) -> torch.Tensor:
        if importance is None or input_ids is None:
            raise ValueError("variant=token_drop needs the importance vector and the input ids")
        num_layers = self.config.num_layers
        transition = num_layers // 2 - 1
        for layer in self.layer[:transition]:
            hidden = layer(hidden, key_mask)
        k = self.config.kept_tokens(hidden.shape[1])
        kept, kept_mask = importance.select(input_ids, key_mask, forced_positions, forced_valid, k)
        waiting = hidden  # the dropped tokens' states wait here unchanged
        short = self.layer[transition](gather_positions(hidden, kept), key_mask, context=hidden)
        for layer in self.layer[transition + 1:num_layers - 1]:
            short = layer(short, kept_mask)
        index = kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        hidden = waiting.scatter(1, index, short)
        return self.layer[num_layers - 1](hidden, key_mask)
