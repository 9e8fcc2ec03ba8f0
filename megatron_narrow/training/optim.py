"""The optimizer (AdamW or LAMB), its parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from megatron_narrow.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only: never on biases and LayerNorm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer: torch's AdamW (fused on CUDA), or LAMB (DeepSpeed's FusedLamb on CUDA when its kernel
    builds, else training/lamb.py). DeepSpeed wraps the result for ZeRO and mixed precision."""
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    groups = parameter_groups(model, config.weight_decay)
    device = next(model.parameters()).device
    if config.optimizer == "lamb":
        if device.type == "cuda":
            try:
                from deepspeed.ops.lamb import FusedLamb

                return FusedLamb(groups, **kwargs)
            except Exception as error:  # noqa: BLE001  (the JIT build needs a CUDA toolkit; any failure falls back)
                warnings.warn(f"DeepSpeed's FusedLamb is unavailable ({error}); using the reference LAMB",
                              stacklevel=2)
        from megatron_narrow.training.lamb import Lamb

        return Lamb(groups, **kwargs)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then linear or cosine decay to min_lr/lr at train_steps (step counts from 0)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr / config.lr
    if config.lr_decay == "constant":
        return 1.0
    span = max(1, config.train_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def set_learning_rate(optimizer: torch.optim.Optimizer, applied_steps: int, config: TrainConfig) -> float:
    """Set and return the rate of the next update: a pure function of the updates applied so far and the
    current config, with no scheduler state. A resumed run with a changed lr, warmup or length therefore
    follows the new schedule from its next step, and a checkpoint never carries a stale one. Steps that
    were skipped (non-finite loss, fp16 overflow) do not advance it, as DeepSpeed's own schedulers do."""
    lr = config.lr * lr_multiplier(applied_steps, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
