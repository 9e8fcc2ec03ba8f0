"""train.precision=auto (training/precision.py): bf16 exactly where the CPU or GPU multiplies bf16 natively."""

from __future__ import annotations

import pytest
import torch

from megatron_narrow.config import TrainConfig
from megatron_narrow.training.precision import resolve_precision, with_resolved_precision


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"), (False, False, "fp32")])
def test_auto_on_the_cpu_follows_its_bf16_instructions(amx, avx512_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    precision, why = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected
    assert ("AMX" in why) if amx else ("AVX512-BF16" in why)


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 0), "fp32")])
def test_auto_on_cuda_wants_bf16_tensor_cores(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: capability[0] >= 8)
    precision, why = resolve_precision("auto", torch.device("cuda", 0))
    assert precision == expected and f"{capability[0]}.{capability[1]}" in why


@pytest.mark.parametrize("setting", ["fp32", "bf16", "fp16"])
def test_a_set_precision_is_kept(setting, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision(setting, torch.device("cpu"))[0] == setting


def test_the_run_config_is_resolved_once_and_left_unchanged(monkeypatch):
    from megatron_narrow.config import load_run_config

    from .conftest import REPO

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    run = load_run_config(str(REPO / "examples/configs/tiny_cpu.yaml"), [])
    assert run.train.precision == "auto"
    resolved, line = with_resolved_precision(run, torch.device("cpu"))
    assert resolved.train.precision == "fp32" and run.train.precision == "auto"
    assert line.startswith("precision fp32 (train.precision=auto: this CPU has neither AMX nor AVX512-BF16")
    with pytest.raises(ValueError, match="train.precision must be auto, fp32, bf16 or fp16, got 'bf32'"):
        TrainConfig(precision="bf32")
