"""SIGTERM (cluster preemption) checkpoints and exits cleanly; a run can start from a Hugging Face directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from .conftest import REPO
from .test_train_resume import command, environment, latest, losses


def test_sigterm_checkpoints_then_the_rerun_finishes_the_schedule(tmp_path, tiny_corpus_data):
    save_dir = tmp_path / "run"
    process = subprocess.Popen(command(tiny_corpus_data, save_dir, "narrow"), env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (save_dir / "metrics.jsonl").is_file() and len(losses(save_dir)) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    stopped_at = max(losses(save_dir))
    assert stopped_at < 10, "the run must stop early on SIGTERM"
    assert f"SIGTERM: checkpoint saved at step {stopped_at}" in stdout
    assert latest(save_dir) == f"step_{stopped_at:07d}"

    result = subprocess.run(command(tiny_corpus_data, save_dir, "narrow"), env=environment(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {stopped_at}" in result.stdout
    assert sorted(losses(save_dir)) == list(range(1, 11))


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
