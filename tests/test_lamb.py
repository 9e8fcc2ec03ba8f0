"""LAMB (training/lamb.py) against its update rule written out here, step by step, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_narrow.training.lamb import Lamb

B1, B2, EPS, LR = 0.9, 0.999, 1e-6, 0.01


def by_hand(x: list[float], grads: list[list[float]], weight_decay: float, lo=0.01, hi=10.0) -> list[float]:
    """The paper's Algorithm 2 with bias correction, one tensor (a flat list), plain Python floats."""
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        m = [B1 * mi + (1 - B1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [B2 * vi + (1 - B2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        r = [(mi / (1 - B1 ** t)) / (math.sqrt(vi / (1 - B2 ** t)) + EPS) + weight_decay * xi
             for mi, vi, xi in zip(m, v, x, strict=True)]
        x_norm, r_norm = math.sqrt(sum(a * a for a in x)), math.sqrt(sum(a * a for a in r))
        trust = min(max(x_norm / r_norm, lo), hi) if x_norm > 0 and r_norm > 0 else 1.0
        x = [xi - LR * trust * ri for xi, ri in zip(x, r, strict=True)]
    return x


def test_two_steps_equal_the_update_rule():
    """A matrix with weight decay and a bias without, as the parameter groups give them."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64) * 1e-3)  # small: the trust clips
    start_w, start_b = weight.detach().clone(), bias.detach().clone()
    grads = [(torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
             for _ in range(2)]
    optimizer = Lamb([{"params": [weight], "weight_decay": 0.01}, {"params": [bias], "weight_decay": 0.0}],
                     lr=LR, betas=(B1, B2), eps=EPS)
    for grad_w, grad_b in grads:
        weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()
    expected_w = by_hand(start_w.flatten().tolist(), [gw.flatten().tolist() for gw, _ in grads], 0.01)
    expected_b = by_hand(start_b.tolist(), [gb.tolist() for _, gb in grads], 0.0)
    torch.testing.assert_close(weight.detach().flatten(), torch.tensor(expected_w, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(bias.detach(), torch.tensor(expected_b, dtype=torch.float64), atol=1e-12, rtol=0)
    # the bias's trust ratio was clipped at 0.01 (|x| ~ 1e-3, |r| ~ 1): a rule without the clip moves it less
    unclipped = by_hand(start_b.tolist(), [gb.tolist() for _, gb in grads], 0.0, lo=0.0)
    assert (torch.tensor(unclipped) - bias.detach()).abs().max() > 1e-6


def test_a_zero_tensor_moves_with_trust_one_and_bad_settings_are_refused():
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    param.grad = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    Lamb([param], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=0.0).step()
    expected = by_hand([0.0] * 4, [[1.0, -2.0, 3.0, 0.5]], 0.0)
    torch.testing.assert_close(param.detach(), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert param.detach().abs().min() > 0.009  # |update| = lr x 1 x ~1 per element
    with pytest.raises(ValueError, match="invalid LAMB settings"):
        Lamb([param], lr=-1.0)
