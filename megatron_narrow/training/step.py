"""One optimizer step over a list of micro-batches, shared by pretraining and fine-tuning.

DeepSpeed's engine accumulates gradients over the micro-batches and applies the update at the last. Before
that update every rank agrees on whether all losses were finite (train.nonfinite_loss decides what a
non-finite loss does), so no rank applies an update another rank skips.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from megatron_narrow.training.engine import agree_finite

Forward = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]
"""batch -> (the loss to backward, anything the after-backward hook needs)"""
AfterBackward = Callable[[dict[str, torch.Tensor], Any, bool], None]
"""(batch, what forward returned beside the loss, whether it was the step's last micro-batch)"""


@contextlib.contextmanager
def _skip_update(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """ZeRO-0 fp32: DeepSpeed steps our AdamW directly, with no overflow check. Inside, its step is a no-op that
    reports an overflow as DeepSpeed's own optimizers do, so the engine skips the update, counts it
    (engine.was_step_applied() is False) and holds the LR schedule."""
    saved = optimizer.__dict__.get("step")  # the LR scheduler's wrapper of step, if any
    optimizer.step = lambda closure=None: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.overflow
        if saved is None:
            del optimizer.step
        else:
            optimizer.step = saved


def train_step(engine, micro_batches: Iterable[dict[str, torch.Tensor]], count: int, forward: Forward, *,
               step: int, policy: str, optimizer: torch.optim.Optimizer, device: torch.device,
               after_backward: AfterBackward | None = None) -> bool:
    """Forward and backward `count` micro-batches (drawn one at a time, so a loader's random draws keep their
    place among the model's), then the update; returns whether every rank's losses were finite.

    A non-finite step raises under policy "stop"; under "skip" the update is not applied (DeepSpeed's
    fp16/bf16/ZeRO optimizers skip non-finite gradients themselves; our own AdamW at ZeRO-0 is told to)."""
    finite = True
    last = count - 1
    for index, batch in enumerate(itertools.islice(micro_batches, count)):
        engine.set_gradient_accumulation_boundary(index == last)  # the accumulation may change between steps
        loss, extra = forward(batch)
        finite = finite and bool(torch.isfinite(loss))
        engine.backward(loss)
        if after_backward is not None:
            after_backward(batch, extra, index == last)
        if index == last:  # before the update: every rank agrees on whether to apply it
            finite = agree_finite(finite, step, policy, device)
        if index == last and not finite and engine.optimizer is optimizer:
            with _skip_update(optimizer):
                engine.step()
        else:
            engine.step()
    return finite
