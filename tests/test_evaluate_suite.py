"""tools/evaluate_suite.py runs the example suite (examples/suites/offline.yaml: a sentence, a pair and a token task
built offline) on a tiny pretrained checkpoint with two seeds; stopped mid-way by SIGTERM and rerun, it finishes only
what was missing, and its table is the mean and std of the runs' own eval_results.json and equals that of runs that
were never interrupted."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

from .conftest import REPO
from .doc_commands import doc_block, doc_workspace
from .runs import WarmJob, latest, run_tool

QUICK = ("--seeds 1 2 --lrs 1e-3 --set train.train_steps=100 train.micro_batch_size=8 task.max_seq_len=32 "
         "train.log_interval=1 train.save_interval=25")


def readme_suite(output_dir: str = "runs/suite") -> dict[str, str]:
    """The README's suite commands at test scale: small tasks, one tiny checkpoint, two seeds, one lr, 100 steps."""
    return {"--checkpoint bert=runs/quality/pretrain/bert_seed1 narrow=runs/quality/pretrain/narrow_seed1":
                "--checkpoint tiny=runs/tiny",
            "--output-dir runs/suite": f"--output-dir {output_dir}", "--jobs 2": f"--jobs 2 {QUICK}"}


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in (output_dir / "runs").glob("*/*/*") if p.is_dir())


def finished(output_dir: Path) -> list[Path]:
    return [p for p in run_dirs(output_dir) if (p / "finetune_summary.json").is_file()]


def training(output_dir: Path) -> list[Path]:
    """Unfinished runs that have logged a step (so they are past start-up, training)."""
    return [p for p in run_dirs(output_dir) if (p / "metrics.jsonl").is_file() and p not in finished(output_dir)]


def suite_argv(work: Path, output_dir: str = "runs/suite") -> list[str]:
    """The README's suite command (at test scale) as the tool's argv."""
    script = doc_block("readme-suite").script(readme_suite(output_dir)).replace("\\\n", " ")
    words = shlex.split(script)
    assert words[:2] == ["python", "tools/evaluate_suite.py"], words
    return words[2:]


def stop_when(ready, deadline_s: float = 300) -> threading.Thread:
    """A thread that sends this process SIGTERM once `ready()` holds: the tool's handler stops its runs, as a
    scheduler's SIGTERM to the suite does."""

    def watch() -> None:
        deadline = time.monotonic() + deadline_s
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_example_suite_survives_a_stop_and_its_table_is_its_runs(tmp_path, reference_runs, monkeypatch,
                                                                     capsys):
    """The README's commands (the suite run in this process, its fine-tuning runs as warm ranks): SIGTERM once two
    runs are done and others train; the rerun finishes only the rest, resuming the stopped ones."""
    work = doc_workspace(tmp_path / "work")
    shutil.copytree(reference_runs("narrow"), work / "runs/tiny")
    doc_block("readme-example-tasks").run(work, replace={
        "runs/example_tasks": "runs/example_tasks --stdlib-only --train 96 --valid 48"})
    monkeypatch.chdir(work)
    output_dir = work / "runs/suite"
    watcher = stop_when(lambda: len(finished(output_dir)) >= 2 and bool(training(output_dir)))
    assert run_tool("evaluate_suite", suite_argv(work), launch=WarmJob) == 75
    watcher.join()
    assert "stopped: every running fine-tuning saved a checkpoint" in capsys.readouterr().out
    interrupted = [p for p in run_dirs(output_dir) if p not in finished(output_dir) and latest(p) is not None]
    assert interrupted, "a run was stopped mid-way with a checkpoint"
    done_before = {p: (p / "eval_results.json").stat().st_mtime_ns for p in finished(output_dir)}

    assert run_tool("evaluate_suite", suite_argv(work), launch=WarmJob) == 0
    output = capsys.readouterr().out
    assert f"6 runs: {len(done_before)} finished earlier, {6 - len(done_before)} to run" in output
    assert all((p / "eval_results.json").stat().st_mtime_ns == t for p, t in done_before.items()), "left alone"
    for run in interrupted:
        assert "resumed from step" in (run / "finetune.log").read_text()
    results = json.loads((output_dir / "suite_results.json").read_text())
    table = results["table"]["tiny"]
    assert set(table["tasks"]) == {"library", "same_library", "sentence_ends"}
    for task, entry in table["tasks"].items():
        values = [100.0 * json.loads((run / "eval_results.json").read_text())[entry["metric"]]
                  for run in sorted((output_dir / "runs" / "tiny" / task).iterdir())]
        assert entry["values"] == values and len(values) == 2
        assert entry["mean"] == statistics.fmean(values) and entry["std"] == statistics.stdev(values)
        assert f"{entry['mean']:.2f} +- {entry['std']:.2f}" in (output_dir / "suite_results.md").read_text()
    assert table["average"] == statistics.fmean(e["mean"] for e in table["tasks"].values())
    assert (output_dir / "suite_results.png").stat().st_size > 0

    # the same suite where the interrupted runs ran in one go: the same table
    fresh = work / "runs/fresh"
    shutil.copytree(output_dir, fresh)
    for run in interrupted:
        shutil.rmtree(fresh / run.relative_to(output_dir))
    assert run_tool("evaluate_suite", suite_argv(work, "runs/fresh"), launch=WarmJob) == 0
    assert f"6 runs: {6 - len(interrupted)} finished earlier, {len(interrupted)} to run" in capsys.readouterr().out
    assert json.loads((fresh / "suite_results.json").read_text())["table"] == results["table"]


def test_the_example_suite_names_the_example_tasks_as_they_are_built():
    """examples/suites/offline.yaml spells out each task's kind, fields and metric: they are the registry's."""
    import yaml

    from megatron_narrow.tasks.example_tasks import EXAMPLE_TASKS

    tasks = yaml.safe_load((REPO / "examples/suites/offline.yaml").read_text())["tasks"]
    assert list(tasks) == list(EXAMPLE_TASKS)
    for name, entry in tasks.items():
        written = {k: v for k, v in entry["task"].items() if not k.endswith("_file")}
        assert written == EXAMPLE_TASKS[name].task_config() and entry["metric"] == EXAMPLE_TASKS[name].metric
        assert [entry["task"]["train_file"], entry["task"]["valid_file"]] == [f"{name}_{split}.jsonl"
                                                                              for split in ("train", "valid")]
