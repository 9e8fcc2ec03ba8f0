"""benchmarks/gpu_check.sh, the one prepared device check, runs end to end on the CPU with --dry-run (tiny shapes):
the gpu tests are collected and skipped, the throughput benchmark writes its JSON with tokens/s, and the log keeps
everything it printed."""

from __future__ import annotations

import json
import os
import re
import subprocess

from .conftest import REPO


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gpu_tests = result.stdout.split("== gpu tests")[1].split("\n== ")[0]
    collected = re.search(r"(\d+) skipped", gpu_tests)
    assert collected and int(collected.group(1)) >= 10 and "passed" not in gpu_tests, gpu_tests
    results = json.loads((tmp_path / "throughput_bf16_seq64.json").read_text())
    assert results["config"]["precision"] == "bf16" and results["config"]["device"].startswith("CPU")
    assert all(results[f"{name}_tokens_per_s"] > 0 for name in ("bert", "narrow", "token_drop", "hf"))
    assert "done: 0 failed step(s)" in (tmp_path / "gpu_check.log").read_text()
    assert subprocess.run(["bash", "benchmarks/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True).returncode == 2
