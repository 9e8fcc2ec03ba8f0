"""Checkpoints made before the package was restructured (formats/, the task-kind registry, one train_step)
still resume and convert: the code of that commit, taken from git, trains a run; today's code resumes it and
converts it. The commit's run must also equal today's run bit for bit: the restructuring changed no behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from .conftest import REPO
from .distributed import free_port
from .runs import assert_same_weights, losses, pretrain_argv, resume_from, run_to_end, run_tool

BEFORE_RESTRUCTURING = "f4f316cf8f4b780563a0c324e61ebf054711d171"
"""main before [arch-v3] moved the checkpoint format and the Hugging Face key map to formats/."""


def package_at(commit: str, target: Path) -> Path:
    """The megatron_narrow package as it was at `commit`, extracted under `target`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "megatron_narrow"],
                             capture_output=True, timeout=60)
    assert archive.returncode == 0, (f"git archive {commit} failed ({archive.stderr.decode().strip()}): this test "
                                     "needs the repository's history (a full clone, not a shallow one)")
    target.mkdir(parents=True, exist_ok=True)
    archive_file = target / "package.tar"
    archive_file.write_bytes(archive.stdout)
    with tarfile.open(archive_file) as tar:
        tar.extractall(target, filter="data")
    return target


def run_old_pretraining(code_dir: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """One rank of the old code's pretrain.py (its own package first on the path, asserted)."""
    program = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import megatron_narrow; "
               "assert megatron_narrow.__file__.startswith(sys.path[0]), megatron_narrow.__file__; "
               "from megatron_narrow.pretrain import exit_now, main; exit_now(main(sys.argv[1:]))")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", program, str(code_dir), *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_checkpoint_from_before_the_restructuring_resumes_and_converts(tmp_path, tiny_corpus_data, reference_runs):
    code_dir = package_at(BEFORE_RESTRUCTURING, tmp_path / "code")
    old_run = tmp_path / "old_run"
    finished = run_old_pretraining(code_dir, pretrain_argv(tiny_corpus_data, old_run, "narrow"))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    reference = reference_runs("narrow")  # today's code, the same run
    assert losses(old_run) == losses(reference)

    resumed = resume_from(old_run, tmp_path / "resumed", 9)
    run_to_end(pretrain_argv(tiny_corpus_data, resumed, "narrow"))
    assert losses(resumed) == losses(reference)
    assert_same_weights(resumed, reference)

    hf_dir = tmp_path / "hf"
    assert run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(old_run), "--output", str(hf_dir)]) == 0
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
