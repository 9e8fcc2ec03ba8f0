"""Activation checkpointing: keep less for backward and recompute it there.

- `full`: each encoder layer keeps only its inputs; its forward runs again in backward.
- `selective`: only the attention core (scores, softmax, dropout, weighted sum) is recomputed: at long
  sequences its B x heads x S x S probabilities and dropout mask are most of what a layer keeps
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
- `none`: everything is kept.

torch.utils.checkpoint (non-reentrant) does the work and restores the global CPU/CUDA RNG state for the
recompute, so hidden dropout draws the same masks. Attention dropout on tensor-parallel heads draws from
our RNGStatesTracker's own stream (parallel/random.py), which torch does not know: a context saves the
tracker's states when the forward runs and puts them back around the recompute, so every dropout mask of
the recompute equals the forward's under any TP size. (DeepSpeed's checkpointing restores DeepSpeed's
tracker, not ours; hence torch's, with this hook.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_narrow.parallel import RNGStatesTracker

MODES = ("none", "full", "selective")


class _TrackerSnapshot:
    """Entered once, at the forward: records the tracker's states."""

    def __init__(self, tracker: RNGStatesTracker) -> None:
        self.tracker, self.states = tracker, None

    def __enter__(self) -> None:
        self.states = self.tracker.state_dict()

    def __exit__(self, *exc) -> None:
        return None


class _TrackerReplay:
    """Entered at every recompute (a pipeline stage's backward can unpack the same checkpoint in two passes):
    puts the forward's states back for the recompute and the current ones after it."""

    def __init__(self, snapshot: _TrackerSnapshot) -> None:
        self.snapshot, self.now = snapshot, None

    def __enter__(self) -> None:
        self.now = self.snapshot.tracker.state_dict()
        self.snapshot.tracker.load_state_dict(self.snapshot.states)

    def __exit__(self, *exc) -> None:
        self.snapshot.tracker.load_state_dict(self.now)


def _tracker_contexts(tracker: RNGStatesTracker | None):
    """(forward context, recompute context) for torch.utils.checkpoint's context_fn."""
    if tracker is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    snapshot = _TrackerSnapshot(tracker)
    return snapshot, _TrackerReplay(snapshot)


def recomputed(fn: Callable[..., torch.Tensor], *args, tracker: RNGStatesTracker | None, **kwargs) -> torch.Tensor:
    """fn(*args, **kwargs), its intermediate activations recomputed in backward with the same dropout masks."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=partial(_tracker_contexts, tracker), **kwargs)


def set_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Switch every encoder layer of `model` (a whole model or a pipeline stage) to `mode`."""
    from megatron_narrow.model.attention import BertSelfAttention
    from megatron_narrow.model.layer import BertLayer

    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, BertLayer):
            module.recompute = mode == "full"
        elif isinstance(module, BertSelfAttention):
            module.recompute_core = mode == "selective"
