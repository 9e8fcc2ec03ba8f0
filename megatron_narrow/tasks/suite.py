"""A fine-tuning suite: tasks x learning rates x seeds for every checkpoint, each an ordinary fine-tuning run, and
the table the papers report (per task the mean +- std over seeds at the learning rate best on validation, and the
GLUE-style average over tasks).

The suite file (YAML):

    seeds: [1, 2, 3]                        # train.seed and model.init_seed of each run
    deepspeed_config: ds_configs/zero0.json # optional
    settings: {train.micro_batch_size: 32}  # optional: finetune config keys every run gets
    tasks:
      mnli:
        task: {kind: sequence, train_file: mnli/train.jsonl, valid_file: mnli/dev.jsonl,
               text_field: premise, text_pair_field: hypothesis}
        metric: accuracy                    # the table's number and the learning-rate choice
        lrs: [2.0e-5, 3.0e-5]
        steps: 2000                         # or epochs: 3 (steps from the train split's size and the batch)
        settings: {task.max_seq_len: 128}   # optional, this task's own

Relative task files are read from the data directory (default: the suite file's). A run is finished when its
directory holds finetune_summary.json for the same settings; a rerun skips finished runs and resumes the others from
their checkpoints (fine-tuning resumes bit for bit), so a killed suite continues where it stopped.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_narrow.tasks.config import TaskConfig
from megatron_narrow.tasks.kinds import read_examples, task_kind
from megatron_narrow.tasks.metrics import LOWER_IS_BETTER

JOB_FILE = "suite_job.json"
"""Written in a run's directory when it starts: the settings it runs with."""
FINISHED_FILE = "finetune_summary.json"
"""Written by fine-tuning's rank 0 at the very end: a run with it is finished."""
RESULTS_FILE = "eval_results.json"


@dataclass(frozen=True)
class SuiteTask:
    name: str
    task: dict
    """TaskConfig fields (kind, files, text fields ...)."""
    metric: str
    lrs: tuple[float, ...]
    steps: int | None = None
    epochs: float | None = None
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    path: Path
    seeds: tuple[int, ...]
    tasks: tuple[SuiteTask, ...]
    settings: dict = field(default_factory=dict)
    deepspeed_config: str = "ds_configs/zero0.json"
    forced: dict = field(default_factory=dict)
    """--set: settings over everything the suite says, steps included."""


@dataclass(frozen=True)
class Job:
    """One fine-tuning run of the suite."""

    checkpoint: str
    """The checkpoint's label (a column of the table)."""
    init_from: str
    task: SuiteTask
    lr: float
    seed: int
    save_dir: Path
    overrides: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return (self.save_dir / FINISHED_FILE).is_file() and self.recorded() == self.record()

    def record(self) -> dict:
        """What the run depends on (not where it lies: a moved output directory keeps its finished runs)."""
        return {"init_from": self.init_from,
                "overrides": [o for o in self.overrides if not o.startswith("train.save_dir=")]}

    def recorded(self) -> dict | None:
        marker = self.save_dir / JOB_FILE
        return json.loads(marker.read_text()) if marker.is_file() else None

    def result(self) -> float:
        return float(json.loads((self.save_dir / RESULTS_FILE).read_text())[self.task.metric])


def _number(value, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None


def _task(name: str, raw, where: str) -> SuiteTask:
    if not isinstance(raw, dict) or not isinstance(raw.get("task"), dict):
        raise ValueError(f"{where}: tasks.{name} needs a `task:` mapping (kind, train_file, valid_file, fields)")
    unknown = sorted(set(raw) - {"task", "metric", "lrs", "steps", "epochs", "settings"})
    if unknown:
        raise ValueError(f"{where}: tasks.{name} has unknown keys {unknown} (task, metric, lrs, steps or epochs, "
                         "settings)")
    try:
        config = TaskConfig(**raw["task"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: tasks.{name}.task: {error}") from None
    if not config.valid_file:
        raise ValueError(f"{where}: tasks.{name}.task needs a valid_file: the table and the lr choice read it")
    metric = raw.get("metric") or config.selection_metric
    reported = (*task_kind(config.kind).metrics, *task_kind(config.kind).reported)
    if metric not in reported:
        raise ValueError(f"{where}: tasks.{name}.metric={metric} is not reported for kind {config.kind} "
                         f"(choose from {', '.join(reported)})")
    if metric not in (*config.chosen_metrics, *task_kind(config.kind).reported):
        raw["task"] = {**raw["task"], "metrics": [*config.chosen_metrics, metric]}
    lrs = raw.get("lrs")
    if not isinstance(lrs, list) or not lrs:
        raise ValueError(f"{where}: tasks.{name}.lrs must be a non-empty list of learning rates")
    if (raw.get("steps") is None) == (raw.get("epochs") is None):
        raise ValueError(f"{where}: tasks.{name} needs exactly one of steps and epochs")
    return SuiteTask(name=name, task=raw["task"], metric=metric,
                     lrs=tuple(_number(lr, f"{where}: tasks.{name}.lrs") for lr in lrs),
                     steps=int(raw["steps"]) if raw.get("steps") is not None else None,
                     epochs=_number(raw["epochs"], f"{where}: tasks.{name}.epochs") if raw.get("epochs") else None,
                     settings=dict(raw.get("settings") or {}))


def load_suite(path: str | Path, data_dir: str | Path | None = None, overrides: list[str] = (),
               seeds: list[int] | None = None, lrs: list[float] | None = None) -> Suite:
    """The suite file at `path`, its relative task files resolved against `data_dir` (default: its folder),
    `overrides` (section.key=value) given to every run last, `seeds` and `lrs` (every task's) instead of the
    file's when given; one-line ValueErrors naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--suite {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"seeds", "tasks", "settings", "deepspeed_config"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (seeds, tasks, settings, deepspeed_config)")
    if lrs:
        for entry in (raw.get("tasks") or {}).values():
            if isinstance(entry, dict):
                entry["lrs"] = list(lrs)
    seeds = list(seeds) if seeds else raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, e.g. [1, 2, 3]")
    if not isinstance(raw.get("tasks"), dict) or not raw["tasks"]:
        raise ValueError(f"{path}: tasks must map task names to their settings")
    base = (Path(data_dir) if data_dir is not None else path.parent).resolve()  # the runs may start elsewhere
    tasks = []
    for name, entry in raw["tasks"].items():
        entry = dict(entry or {})
        if isinstance(entry.get("task"), dict):
            entry["task"] = {key: str(base / value) if key.endswith("_file") and value and not Path(value).is_absolute()
                             else value for key, value in entry["task"].items()}
        tasks.append(_task(str(name), entry, str(path)))
    for task in tasks:
        for key in ("train_file", "valid_file", "test_file"):
            file = task.task.get(key)
            if file and not Path(file).exists():
                raise ValueError(f"{path}: tasks.{task.name}.task.{key}: {file} does not exist "
                                 f"(relative files are read from {base}; --data-dir sets it)")
    forced = {}
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or "." not in key:
            raise ValueError(f"--set {override}: expected section.key=value")
        forced[key] = yaml.safe_load(value)
    deepspeed = Path(raw.get("deepspeed_config") or Suite.deepspeed_config)
    if not deepspeed.is_file():
        raise ValueError(f"{path}: deepspeed_config {deepspeed} does not exist (relative to {Path.cwd()})")
    return Suite(path=path, seeds=tuple(seeds), tasks=tuple(tasks), settings=dict(raw.get("settings") or {}),
                 deepspeed_config=str(deepspeed.resolve()), forced=forced)


def checkpoint_labels(checkpoints: list[str]) -> list[tuple[str, str]]:
    """(label, path) of each --checkpoint (LABEL=PATH, or PATH labelled by its folder name); labels unique."""
    out: list[tuple[str, str]] = []
    for given in checkpoints:
        label, _, path = given.partition("=") if "=" in given else (Path(given).name, "", given)
        if not Path(path).exists():
            raise ValueError(f"--checkpoint {path} does not exist")
        if any(label == seen for seen, _ in out):
            raise ValueError(f"--checkpoint {given}: the label {label!r} is taken; name it LABEL=PATH")
        out.append((label, str(Path(path).resolve())))
    return out


def _steps(task: SuiteTask, settings: dict) -> int:
    """task.steps, or its epochs over the train split at the run's global batch."""
    if task.steps is not None:
        return task.steps
    examples = len(read_examples(task.task["train_file"], TaskConfig(**task.task)))
    batch = int(settings.get("train.global_batch_size") or settings.get("train.micro_batch_size") or 32)
    return max(1, math.ceil(task.epochs * examples / batch))


def plan_jobs(suite: Suite, checkpoints: list[tuple[str, str]], output_dir: str | Path) -> list[Job]:
    """Every (checkpoint, task, lr, seed) run, in the order they start: tasks first, seeds last, so that a
    killed suite has whole learning rates of the first tasks done."""
    jobs = []
    for task in suite.tasks:
        settings = {**suite.settings, **task.settings}
        steps = _steps(task, settings)
        for label, init_from in checkpoints:
            for lr in task.lrs:
                for seed in suite.seeds:
                    save_dir = Path(output_dir) / "runs" / label / task.name / f"lr{lr:g}_seed{seed}"
                    values = {**settings,
                              **{f"task.{k}": v for k, v in task.task.items()}, "model.init_from": init_from,
                              "train.lr": lr, "train.train_steps": steps, "train.seed": seed,
                              "model.init_seed": seed, "train.save_dir": str(save_dir), **suite.forced}
                    values.setdefault("train.warmup_steps", max(1, int(values["train.train_steps"]) // 10))
                    overrides = tuple(f"{key}={_yaml_value(value)}" for key, value in values.items())
                    jobs.append(Job(label, init_from, task, lr, seed, save_dir, overrides))
    return jobs


def _yaml_value(value) -> str:
    """A value as a section.key=value override reads it back (YAML flow style for lists)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def summarise(suite: Suite, checkpoints: list[tuple[str, str]], jobs: list[Job]) -> dict:
    """Per checkpoint and task: every lr's values over seeds, the best lr by mean, its mean and std; per checkpoint
    the average over tasks of those means. Only finished runs count; a task with an unfinished lr is left out."""
    table: dict[str, dict] = {}
    for label, _ in checkpoints:
        row = {}
        for task in suite.tasks:
            by_lr = {}
            for lr in task.lrs:
                runs = [j for j in jobs if j.checkpoint == label and j.task.name == task.name and j.lr == lr]
                if runs and all(j.finished for j in runs):
                    by_lr[f"{lr:g}"] = [100.0 * j.result() for j in runs]
            if len(by_lr) == len(task.lrs):
                pick = min if task.metric in LOWER_IS_BETTER else max
                best = pick(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
                values = by_lr[best]
                row[task.name] = {"metric": task.metric, "best_lr": float(best), "mean": statistics.fmean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values,
                                  "by_lr": {lr: statistics.fmean(v) for lr, v in by_lr.items()}}
        complete = len(row) == len(suite.tasks)
        table[label] = {"tasks": row,
                        "average": statistics.fmean(r["mean"] for r in row.values()) if complete else None}
    return {"suite": str(suite.path), "seeds": list(suite.seeds),
            "checkpoints": {label: path for label, path in checkpoints}, "table": table,
            "runs": [{"checkpoint": j.checkpoint, "task": j.task.name, "lr": j.lr, "seed": j.seed,
                      "save_dir": str(j.save_dir), "finished": j.finished,
                      j.task.metric: j.result() if j.finished else None} for j in jobs]}


def markdown_table(results: dict, suite: Suite) -> str:
    """Tasks as rows, checkpoints as columns: mean +- std (best lr), in points; the average last."""
    labels = list(results["table"])
    lines = ["| task (metric) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task in suite.tasks:
        cells = []
        for label in labels:
            entry = results["table"][label]["tasks"].get(task.name)
            cells.append("unfinished" if entry is None else
                         f"{entry['mean']:.2f} +- {entry['std']:.2f} (lr {entry['best_lr']:g})")
        lines.append(f"| {task.name} ({task.metric}) | " + " | ".join(cells) + " |")
    averages = [results["table"][label]["average"] for label in labels]
    lines.append("| **average** | " + " | ".join("unfinished" if a is None else f"**{a:.2f}**" for a in averages)
                 + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, suite: Suite, output: str | Path) -> Path:
    """Grouped bars: one group per task, one bar per checkpoint (mean at the best lr, std as the error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["table"])
    width = 0.8 / max(len(labels), 1)
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(suite.tasks) * max(1, len(labels)) ** 0.5), 3.2))
    for index, label in enumerate(labels):
        entries = [results["table"][label]["tasks"].get(task.name) for task in suite.tasks]
        axes.bar([t + index * width for t in range(len(suite.tasks))], [e["mean"] if e else 0.0 for e in entries],
                 width, yerr=[e["std"] if e else 0.0 for e in entries], capsize=3, label=label)
    axes.set_xticks([t + width * (len(labels) - 1) / 2 for t in range(len(suite.tasks))],
                    [f"{task.name}\n({task.metric})" for task in suite.tasks])
    axes.set_ylabel("validation score (points)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
