"""SIGTERM (cluster preemption) checkpoints and exits cleanly; a run can start from a Hugging Face directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO
from .training_runs import STEPS, command, environment, latest, losses


def stop_mid_run(command_line: list[str], save_dir, signum: int, *, group: bool) -> tuple[int, str, int]:
    """Start a run, send `signum` once two steps are logged (to the whole process group, as a terminal's Ctrl-C
    or SLURM's --signal does, or to the main process only); returns (exit code, stdout, last logged step)."""
    process = subprocess.Popen(command_line, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (save_dir / "metrics.jsonl").is_file() and len(losses(save_dir)) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before the signal"
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert "Traceback" not in stderr, stderr[-3000:]
    return process.returncode, stdout, max(losses(save_dir))


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True),
                                               (signal.SIGTERM, True)], ids=["sigterm", "ctrl_c_group",
                                                                             "sigterm_group_with_workers"])
def test_signal_checkpoints_then_the_rerun_equals_an_uninterrupted_run(tmp_path, tiny_corpus_data, reference_runs,
                                                                       signum, group):
    """SIGTERM and Ctrl-C save a checkpoint at the step boundary and exit 0, also when the signal reaches the
    DataLoader workers (train.num_workers=1: they leave it to the main process); the rerun finishes the
    schedule with the losses of an uninterrupted run, bit for bit."""
    save_dir = tmp_path / "run"
    workers = {"train.num_workers": "1"} if group else {}
    code, stdout, stopped_at = stop_mid_run(command(tiny_corpus_data, save_dir, "narrow", **workers), save_dir,
                                            signum, group=group)
    assert code == 75, "stopped early with a checkpoint: EX_TEMPFAIL, run again to resume"
    assert stopped_at < STEPS, "the run must stop early"
    assert f"{signal.Signals(signum).name}: checkpoint saved at step {stopped_at}" in stdout
    assert latest(save_dir) == f"step_{stopped_at:07d}"

    result = subprocess.run(command(tiny_corpus_data, save_dir, "narrow", **workers), env=environment(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {stopped_at}" in result.stdout
    assert losses(save_dir) == losses(reference_runs("narrow"))


def test_init_from_hugging_face_starts_from_its_weights(tmp_path, tiny_corpus_data):
    """Continue pretraining from an HF export of a trained run: the first loss starts where that run ended,
    far below a fresh model's."""
    trained = tmp_path / "trained"
    subprocess.run(command(tiny_corpus_data, trained, "bert"), check=True, env=environment(), capture_output=True)
    hf_dir = tmp_path / "hf"
    subprocess.run([sys.executable, str(REPO / "tools/convert_checkpoint_to_hf.py"), "--checkpoint", str(trained),
                    "--output", str(hf_dir)], check=True, env=environment(), capture_output=True)
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 1000

    fresh = losses(trained)[1]
    continued = tmp_path / "continued"
    cmd = command(tiny_corpus_data, continued, "bert") + [f"train.init_from_hf={hf_dir}"]
    subprocess.run(cmd, check=True, env=environment(), capture_output=True)
    first = losses(continued)[1]
    assert first < fresh - 0.5, f"continued pretraining starts at {first:.3f}, a fresh model at {fresh:.3f}"
    assert first < losses(trained)[10] + 0.3, "it must start about where the trained run ended"
