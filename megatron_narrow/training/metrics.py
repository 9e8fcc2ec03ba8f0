"""Rank-0 output: metrics.jsonl (one object per logged step), tensorboard events, a console line."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a kill (or empty) sorts after every step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, save_dir: str | Path, *, enabled: bool, resume_step: int, total_steps: int,
                 wandb_project: str | None = None, run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.wandb = None
        self.path = Path(save_dir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(save_dir) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional at run time
            self.writer = None
        if wandb_project:
            self.wandb = start_wandb(Path(save_dir), wandb_project, run_config or {})
        self.started = time.perf_counter()
        self.start_step = resume_step

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after the checkpoint we resume from: the rerun logs them again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        strict = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:  # strict JSON: NaN/inf become null
            f.write(json.dumps(strict, allow_nan=False) + "\n")
        scalars = {(f"train/{key}" if not key.startswith("eval") else key): value for key, value in strict.items()
                   if key != "step" and isinstance(value, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        step = record["step"]
        if "loss" not in record:  # an evaluation
            values = " | ".join(f"{k.removeprefix('eval_').replace('_', ' ')} {v:.4f}" for k, v in record.items()
                                if k != "step" and isinstance(v, float))
            print(f"step {step}/{self.total_steps} | eval {values}", flush=True)
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.start_step, 1) * (self.total_steps - step)
        speed = f" | {record['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in record else ""
        if "real_token_fraction" in record:
            speed += f" ({record['real_token_fraction'] * 100:.0f}% real)"
        mfu = f" | mfu {record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else ""
        loss = "nan" if strict["loss"] is None else f"{record['loss']:.4f}"
        print(f"step {step}/{self.total_steps} | loss {loss} | lr {record['lr']:.3e}{speed} | "
              f"step {record['step_time_s']:.3f} s{mfu} | eta {eta / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_ID_FILE = "wandb_run_id"


def start_wandb(save_dir: Path, project: str, run_config: dict):
    """A W&B run for save_dir: the same one again when the run resumes (its id is kept in save_dir)."""
    import wandb

    id_file = save_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", name=save_dir.resolve().name, dir=str(save_dir),
                      config=run_config)


def end_of_run_summary(save_dir: str | Path, checkpoint_dir: Path, *, steps: int, steps_this_run: int,
                       seconds: float, records: list[dict]) -> str:
    """What a finished run printed last: how long it took, where its losses ended, where everything is and
    what to run next."""
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    ended = (f" | last loss {losses[-1]:.4f}" if losses else "") + (
        f" | last validation loss {evals[-1]:.4f}" if evals else "")
    save_dir = Path(save_dir)
    return "\n".join([
        f"done: step {steps} ({steps_this_run} this run, {seconds / 60:.1f} min){ended}",
        f"  checkpoint  {checkpoint_dir}",
        f"  metrics     {save_dir / 'metrics.jsonl'}   (tensorboard --logdir {save_dir / 'tensorboard'})",
        f"  next        python tools/plot_metrics.py {save_dir}",
        f"              python tools/convert_checkpoint_to_hf.py --checkpoint {save_dir} --output HF_DIR",
    ])
