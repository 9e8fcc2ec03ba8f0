"""Loss curves from metrics.jsonl: training loss (solid) and validation loss (dashed, dots) against steps,
one colour per run, so that runs of several variants overlay on one figure (tools/plot_metrics.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LossCurves:
    name: str
    steps: list[int]
    losses: list[float]
    eval_steps: list[int]
    eval_losses: list[float]


def read_loss_curves(run_dir: str | Path, name: str | None = None) -> LossCurves:
    """The curves of one run (its save_dir, holding metrics.jsonl); lines torn by a kill are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: give a pretraining or fine-tuning train.save_dir")
    curves = LossCurves(name or Path(run_dir).name, [], [], [], [])
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("loss") is not None:
            curves.steps.append(record["step"])
            curves.losses.append(record["loss"])
        if record.get("eval_loss") is not None:
            curves.eval_steps.append(record["step"])
            curves.eval_losses.append(record["eval_loss"])
    return curves


def plot_loss_curves(runs: list[LossCurves], output: str | Path, title: str = "MLM loss") -> Path:
    """Write the figure (PNG, or any format matplotlib knows by the suffix) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for index, run in enumerate(runs):
        colour = f"C{index}"
        axes.plot(run.steps, run.losses, color=colour, label=f"{run.name} (training)")
        if run.eval_steps:
            axes.plot(run.eval_steps, run.eval_losses, color=colour, linestyle="--", marker="o",
                      label=f"{run.name} (validation)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
