"""Preemption on a real SLURM: examples/pretrain_slurm.sbatch, a 1-minute limit and an early --signal.

SLURM signals every process of the step (the DataLoader worker too). The run must save a checkpoint and
exit 75, the batch script must requeue the job, and the requeued job must resume and finish with the
losses of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO, tiny_train_overrides
from .distributed import free_port
from .slurm_cluster import LocalSlurm, slurm_installed
from .training_runs import environment, losses

STEPS = 1200  # ~0.03 s each: the first job is still training when the signal comes ~28 s after it starts


def overrides(data, save_dir) -> list[str]:
    return tiny_train_overrides(data, save_dir, "narrow", steps=STEPS, **{"train.num_workers": "1",
                                                                        "train.log_interval": "1"})


def test_slurm_preemption_checkpoints_requeues_and_resumes_exactly(tmp_path, tiny_corpus_data):
    if not slurm_installed():
        if os.environ.get("CI"):
            pytest.fail("slurm-wlm is not installed: tools/install.sh installs it")
        pytest.skip("slurm-wlm is not installed (tools/install.sh installs it)")
    reference_dir = tmp_path / "reference"
    reference = subprocess.Popen(
        [sys.executable,
         str(REPO / "megatron_narrow/pretrain.py"), "--config", str(REPO / "examples/configs/tiny_cpu.yaml"),
         "--deepspeed_config", str(REPO / "ds_configs/zero0.json"), *overrides(tiny_corpus_data, reference_dir)],
        env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    save_dir, log = tmp_path / "slurm_run", tmp_path / "job.log"
    job_env = {**environment(), "DS_CONFIG": "ds_configs/zero0.json", "MASTER_PORT": str(free_port())}
    with LocalSlurm(tmp_path / "slurm") as slurm:
        job = slurm.sbatch(["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                            "--time=1", "--signal=TERM@55", f"--output={log}", f"--chdir={REPO}",
                            str(REPO / "examples/pretrain_slurm.sbatch"), str(REPO / "examples/configs/tiny_cpu.yaml"),
                            *overrides(tiny_corpus_data, save_dir)], env=job_env)
        requeued = slurm.wait_for(job, lambda info: info.get("Restarts") == "1" or info["JobState"] in
                                  ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), timeout=120)
        assert requeued.get("Restarts") == "1", (requeued, log.read_text()[-3000:])
        # SLURM holds a requeued job for two minutes, and it would get the same 1-minute limit (and signal)
        # again: release it now with room to finish
        slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=10"])
        done = slurm.wait_for(job, lambda info: info["JobState"] in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"),
                              timeout=240)
    output = log.read_text()
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", (done, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    stopped = [line for line in output.splitlines() if "SIGTERM: checkpoint saved at step" in line]
    assert len(stopped) == 1, output[-3000:]
    step = int(stopped[0].split("step ")[1].split(";")[0])
    assert 0 < step < STEPS
    assert "stopped early with a checkpoint; requeueing it to resume" in output
    assert f"resumed from step {step}" in output

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    expected = losses(reference_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(save_dir) == expected
