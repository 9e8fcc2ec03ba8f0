"""model/dropout.py: masks from 16 random bits an element, in distribution torch's dropout."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_narrow.model.dropout import LANE_STATES, Dropout, dropout, keep_mask

N = 1 << 22  # 4M elements: the drop fraction's standard error at p = 0.1 is 1.5e-4


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_each_element_is_dropped_with_probability_p_independently(p):
    """The drop fraction is k / 65536 (k = round(p * 65536)) within 5 standard errors, overall, in each of the four
    lanes a 64-bit draw is cut into and along a row; neighbours are uncorrelated (lag 1 inside a draw, lag 4
    across draws) within 5 standard errors of a zero correlation."""
    torch.manual_seed(0)
    kept, scale = keep_mask(torch.Size((N // 512, 512)), p, torch.device("cpu"))
    dropped = ~kept
    q = round(p * LANE_STATES) / LANE_STATES
    assert abs(q - p) <= 0.5 / LANE_STATES and scale == 1 / (1 - q)
    flat = dropped.reshape(-1).double()

    def within(fraction: float, n: int) -> bool:
        return abs(fraction - q) <= 5 * math.sqrt(q * (1 - q) / n)

    assert within(flat.mean().item(), N)
    for lane in range(4):
        assert within(flat[lane::4].mean().item(), N // 4), f"lane {lane}"
    assert within(dropped[:, 7].double().mean().item(), N // 512)
    centred = (flat - q) / math.sqrt(q * (1 - q))
    for lag in (1, 4):
        correlation = (centred[:-lag] * centred[lag:]).mean().item()
        assert abs(correlation) <= 5 / math.sqrt(N), f"lag {lag}: {correlation}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_output_and_gradient_are_the_input_masked_and_scaled_exactly(dtype):
    """Kept elements are x / (1 - q) bit for bit (one rounding in bf16, as masked_fill then mul_), dropped ones 0;
    the gradient is the same mask and scale applied to the incoming gradient; the mean of dropout(ones) is 1
    within its standard error bound."""
    torch.manual_seed(1)
    x = torch.randn(63, 5, 101, 301, dtype=dtype, requires_grad=True)  # numel not a multiple of 4 draws
    state = torch.get_rng_state()
    out = dropout(x, 0.1)
    torch.set_rng_state(state)
    kept, scale = keep_mask(x.shape, 0.1, x.device)
    assert scale == LANE_STATES / (LANE_STATES - round(0.1 * LANE_STATES))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert torch.equal(out[kept], x[kept] * scale)
    grad = torch.randn_like(x)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * scale, 0.0))
    ones = dropout(torch.ones(N, dtype=torch.float64), 0.1)
    assert abs(ones.mean().item() - 1) <= 5 * math.sqrt(0.1 / 0.9 / N)


def test_masks_follow_the_seed_and_do_not_depend_on_the_dtype():
    """Same seed, same masks, in fp32 and in bf16: a bf16 run draws what its fp32 twin draws."""
    x = torch.randn(3, 5, 7)
    torch.manual_seed(5)
    a = dropout(x, 0.2)
    torch.manual_seed(5)
    b = dropout(x.bfloat16(), 0.2)
    torch.manual_seed(6)
    c = dropout(x, 0.2)
    assert torch.equal(a == 0, b == 0) and not torch.equal(a == 0, c == 0)


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(10, 10)
    module = Dropout(0.3).eval()
    assert module(x) is x and dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
