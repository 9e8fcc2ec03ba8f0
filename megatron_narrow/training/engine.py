"""What pretraining and fine-tuning share around DeepSpeed: the device, the engine with our AdamW, the
all-ranks agreement on a finite loss, and rank-0 printing. One place, so a fix to one (such as the fp16
optimizer's stray first step) reaches both loops."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron_narrow.config import TrainConfig
from megatron_narrow.training.optim import build_optimizer
from megatron_narrow.training.stop import StopSignal


def training_device() -> torch.device:
    """This rank's accelerator (the launcher set the current CUDA device from LOCAL_RANK), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce(value: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over `group` (the world by default); a no-op without torch.distributed."""
    if dist.is_initialized():
        dist.all_reduce(value, op=op, group=group)
    return value


def agree_to_stop(stop: StopSignal, device: torch.device) -> bool:
    """Whether any rank has received a stop signal (every rank asks at the same step boundary)."""
    flag = torch.tensor(float(stop.received is not None), device=device)
    return all_reduce(flag, op=dist.ReduceOp.MAX).item() > 0


def agree_finite(finite: bool, step: int, policy: str, device: torch.device) -> bool:
    """Whether every rank's losses were finite; raises under train.nonfinite_loss=stop if not."""
    finite = all_reduce(torch.tensor(float(finite), device=device), op=dist.ReduceOp.MIN).item() >= 1
    if not finite and policy == "stop":
        raise FloatingPointError(f"non-finite loss at step {step}; stopping (train.nonfinite_loss=stop; set it to "
                                 "skip to skip such steps and count them)")
    return finite


def build_engine(model: nn.Module, train: TrainConfig, ds_config: dict, mpu=None, compile_model: bool = False):
    """(engine, our AdamW) for `model`: DeepSpeed wraps the optimizer as the ZeRO stage and precision ask, and
    compiles the module (engine.compile: torch.compile with the accelerator's backend) when `compile_model`.

    ZeRO-0 fp16/bf16: DeepSpeed's FP16 wrappers take one zero-gradient step of our AdamW to create its state,
    which would start Adam's bias correction at step 2 (first update ~0.74 lr); that state is dropped here
    (ZeRO 1-3 do not take such a step)."""
    import deepspeed
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = build_optimizer(model, train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    if isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        optimizer.state.clear()
    if compile_model:
        engine.compile()
    return engine, optimizer


def rank0_print(is_rank0: bool) -> Callable[[str], None]:
    """print(line, flush=True) on rank 0; nothing elsewhere."""
    return (lambda line: print(line, flush=True)) if is_rank0 else (lambda line: None)
