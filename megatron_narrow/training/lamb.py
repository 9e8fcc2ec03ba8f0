"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"),
written out for the CPU and as the reference DeepSpeed's fused CUDA kernel is compared against.

Per tensor x with gradient g, at step t (Algorithm 2 of the paper, with Adam's bias correction):
    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd x
    x = x - lr * phi(||x|| / ||r||) * r
with phi clipping the trust ratio to [min_trust, max_trust] (DeepSpeed's FusedLamb defaults, 0.01 and 10)
and a ratio of 1 where either norm is zero. The trust ratio is per tensor, which is why ZeRO's flattened
partitions cannot run it (training/setup.py refuses that combination).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, min_trust: float = 0.01,
                 max_trust: float = 10.0) -> None:
        if lr <= 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not 0 < min_trust <= max_trust:
            raise ValueError(f"invalid LAMB settings: lr={lr} betas={betas} eps={eps} trust=[{min_trust}, {max_trust}]")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_trust=min_trust,
                                      max_trust=max_trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                dtype = torch.promote_types(param.dtype, torch.float32)  # fp16/bf16 tensors update in fp32
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
                state["step"] += 1
                step = state["step"]
                grad, weights = param.grad.to(dtype), param.to(dtype)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1 ** step)) / ((exp_avg_sq / (1 - beta2 ** step)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(weights, alpha=group["weight_decay"])
                weight_norm, update_norm = weights.norm().item(), update.norm().item()
                trust = 1.0
                if weight_norm > 0 and update_norm > 0 and math.isfinite(weight_norm / update_norm):
                    trust = min(max(weight_norm / update_norm, group["min_trust"]), group["max_trust"])
                param.add_(update.to(param.dtype), alpha=-group["lr"] * trust)
        return loss
