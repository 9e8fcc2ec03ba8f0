"""Every attention backend this machine can run gives the outputs and gradients of the `math` reference, for
every variant, unpacked and with packed segments (fp32, dropout 0); an unavailable one is refused."""

from __future__ import annotations

import pytest
import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model.attention_backends import BACKENDS, attention_backend

VOCAB, SEQ, M = 200, 32, 6


def batch(packed: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (3, SEQ), generator=g)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 20:] = 0
    out = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
           "target_positions": torch.randint(1, 20, (3, M), generator=g).sort(dim=1).values,
           "target_ids": torch.randint(5, VOCAB, (3, M), generator=g),
           "target_valid": torch.ones(3, M, dtype=torch.bool)}
    if packed:  # three segments in row 0, two in row 2, one in row 1
        segments = torch.ones(3, SEQ, dtype=torch.long)
        segments[0, 10:] = 2
        segments[0, 22:] = 3
        segments[2, 16:] = 2
        segments[1, 20:] = 0
        positions = torch.arange(SEQ).repeat(3, 1)
        for row in range(3):
            for number in segments[row].unique().tolist():
                where = segments[row] == number
                positions[row, where] = torch.arange(int(where.sum()))
        out.update(segment_ids=segments, position_ids=positions)
    return out


def run(variant: str, backend: str, data: dict[str, torch.Tensor], device: str = "cpu",
        dtype: torch.dtype = torch.float32):
    """(per-target losses, gradients by parameter name) of one forward and backward (tests/test_gpu.py: on CUDA)."""
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=SEQ,
                         full_length_layers=2, hidden_dropout=0.0, attention_dropout=0.0, token_drop_keep_ratio=0.75,
                         attention_backend=backend, variant=variant)
    model = BertForPreTraining(config, special_ids={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    model.to(device, dtype)
    out = model(**data)
    out.loss.backward()
    return out.target_losses, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "segments"])
@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
def test_backends_equal_the_math_reference(variant, packed):
    data = batch(packed)
    expected, expected_grads = run(variant, "math", data)
    assert len(BACKENDS) >= 2
    for backend in BACKENDS:
        got, grads = run(variant, backend, data)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=f"{backend} {name}")


def test_unavailable_backend_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"model.attention_backend='flash9' is not available here; choose one of "
                                         r"math, sdpa, varlen"):
        attention_backend("flash9")
