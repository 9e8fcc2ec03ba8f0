"""The CUDA path, on a GPU machine only (`pytest -m gpu`, run by benchmarks/gpu_check.sh; skipped without CUDA):
every attention backend equals `math` on CUDA (fp32, and bf16 within its rounding), a bf16 ZeRO-1 run trains,
CUDA RNG states round-trip (a resumed run with dropout equals the uninterrupted one bit for bit), NCCL starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .conftest import REPO
from .distributed import free_port
from .runs import latest, losses, pretrain_argv
from .test_attention_backends import batch, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_LOSS_TOLERANCE = 5e-2
"""bf16 keeps 8 bits of mantissa: per-target losses of a 4-layer model within 0.05 of fp32 math's."""
BF16_GRAD_TOLERANCE = 5e-2
"""and each gradient within 5% of its fp32 norm."""


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "segments"])
@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_backends_equal_math_on_cuda(backend, variant, packed):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    data = {key: value.cuda() for key, value in batch(packed).items()}
    expected, expected_grads = run(variant, "math", data, device="cuda")
    got, grads = run(variant, backend, data, device="cuda")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=1e-4, msg=f"{backend} {name}")
    got, grads = run(variant, backend, data, device="cuda", dtype=torch.bfloat16)
    assert (got.float() - expected).abs().max() <= BF16_LOSS_TOLERANCE
    for name, grad in grads.items():
        error = (grad.float() - expected_grads[name]).norm() / expected_grads[name].norm().clamp(min=1e-12)
        assert error <= BF16_GRAD_TOLERANCE, f"{backend} {name}: {error:.3f}"


def cuda_env() -> dict[str, str]:
    """Rank 0 of one on the GPU, in a fresh process (the tests' fork server has DeepSpeed's CPU accelerator)."""
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def cuda_run(argv: list[str]) -> subprocess.CompletedProcess:
    """`python megatron_narrow/pretrain.py argv` on the GPU, to its end."""
    result = subprocess.run([sys.executable, str(REPO / "megatron_narrow/pretrain.py"), *argv], env=cuda_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_bf16_zero1_run_trains_on_cuda(tmp_path, tiny_corpus_data):
    save_dir = tmp_path / "run"
    cuda_run(pretrain_argv(tiny_corpus_data, save_dir, "narrow", ds_config=str(REPO / "ds_configs/zero1.json"),
                           **{"train.precision": "bf16", "train.train_steps": "6"}))
    values = losses(save_dir)
    assert sorted(values) == list(range(1, 7)) and all(v == v and v < 20 for v in values.values()), values


def test_cuda_rng_states_round_trip_bit_exactly(tmp_path, tiny_corpus_data):
    """Dropout on (tiny_cpu.yaml's 0.1), fp32, the math kernel (deterministic): a 10-step run stopped by SIGTERM
    once step 3 is checkpointed, then resumed, gives the uninterrupted run's losses bit for bit."""
    settings = {"train.precision": "fp32", "model.attention_backend": "math", "train.save_interval": "3",
                "train.train_steps": "10"}
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    cuda_run(pretrain_argv(tiny_corpus_data, whole, "narrow", **settings))
    argv = pretrain_argv(tiny_corpus_data, stopped, "narrow", **settings)
    process = subprocess.Popen([sys.executable, str(REPO / "megatron_narrow/pretrain.py"), *argv], env=cuda_env(),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while latest(stopped) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75
    stopped_at = int(latest(stopped).removeprefix("step_"))
    assert stopped_at < 10
    assert f"resumed from step {stopped_at}" in cuda_run(argv).stdout
    assert losses(stopped) == losses(whole) and len(losses(whole)) == 10


def test_nccl_starts_on_one_rank():
    code = ("import torch, torch.distributed as dist; "
            f"dist.init_process_group('nccl', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1); "
            "t = torch.ones(2, device='cuda'); dist.all_reduce(t); print(t.sum().item()); "
            "dist.destroy_process_group()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "2.0", result.stderr[-2000:]
