"""Checkpoints through DeepSpeed, plus what DeepSpeed does not know: data position, RNG states, our config,
and whether a checkpoint is whole.

Layout: SAVE_DIR/checkpoints/step_NNNNNNN/ (DeepSpeed's files, run_config.json, layout.json, tokenizer copy,
and complete.json written last) and SAVE_DIR/checkpoints/latest, a one-line file naming the newest save.

Nothing lost: a tag is used only when its completion marker lists every file with its size and the
files match (a kill mid-save, a partial rsync, a truncated copy all fail that check). When `latest`
names a tag that is missing or incomplete, or a tag fails to load, the run falls back to the newest
complete tag and says in one line what it skipped and why. A save directory whose tags are all unusable
is refused rather than overwritten (unless train.restart=true, which moves them aside). Pruning never
deletes a tag newer than the one being saved, so a run resumed from an older tag cannot destroy a newer one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_narrow.config import ModelConfig
from megatron_narrow.file_safety import (
    UnsafeCheckpoint,
    check_checkpoint_directory,
    confined,
    load_checkpoint_file,
)
from megatron_narrow.parallel import RNGStatesTracker

LATEST = "latest"
CONFIG_NAME = "run_config.json"
LAYOUT_NAME = "layout.json"
COMPLETE_NAME = "complete.json"
TAG_PREFIX = "step_"
UNIVERSAL_SUFFIX = "_universal"
PIPELINE_ITEM_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
"""A pipeline checkpoint's per-item module state (item index, tensor-parallel rank)."""
"""TAG_universal: DeepSpeed's universal conversion of TAG for a resume on another layout (training/layout.py);
derived data, removed once a newer tag is saved."""


def checkpoint_root(save_dir: str | Path) -> Path:
    return Path(save_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def step_of(tag: str) -> int:
    return int(tag[len(TAG_PREFIX):])


def all_tags(save_dir: str | Path) -> list[str]:
    """Every step_ directory under SAVE_DIR/checkpoints, oldest first (complete or not)."""
    root = checkpoint_root(save_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[len(TAG_PREFIX):].isdigit())


def write_completion_marker(path: Path) -> None:
    """List every file of the tag with its size, then publish the list atomically: written last, it says
    the tag is whole, and the sizes let a later run detect a file truncated by a copy or a full disk."""
    files = {str(p.relative_to(path)): p.stat().st_size
             for p in sorted(path.rglob("*")) if p.is_file() and p.name != COMPLETE_NAME}
    tmp = path / f"{COMPLETE_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_NAME)


def incomplete_reason(path: Path) -> str | None:
    """Why the tag at `path` cannot be trusted, or None when its marker and files agree."""
    if not path.is_dir():
        return "it does not exist"
    marker = path / COMPLETE_NAME
    if not marker.is_file():
        return f"it has no {COMPLETE_NAME} (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"its {COMPLETE_NAME} is unreadable"
    for name, size in files.items():
        file = confined(path, name, what=str(marker))
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def latest_tag(save_dir: str | Path) -> str | None:
    """The tag a run resumes from: `latest` if it names a complete tag, else the newest complete tag."""
    plan = plan_resume(save_dir)
    return plan.candidates[0] if plan.candidates else None


@dataclass
class ResumePlan:
    """Which tags to try, in order, and the tags passed over with the reason."""

    candidates: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def skipped_line(self) -> str:
        return "; ".join(f"{tag}: {why}" for tag, why in self.skipped)


def plan_resume(save_dir: str | Path) -> ResumePlan:
    """`latest`'s tag first when complete, then every other complete tag, newest first."""
    root = checkpoint_root(save_dir)
    tags = all_tags(save_dir)
    plan = ResumePlan(tags=tags)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if named is not None:
        why = incomplete_reason(root / named) if named else "it is empty"
        if why is None:
            plan.candidates.append(named)
        else:
            plan.skipped.append((named or LATEST, f"named by {LATEST}, but {why}"))
    for tag in reversed(tags):
        if tag == named:
            continue
        why = incomplete_reason(root / tag)
        if why is None:
            plan.candidates.append(tag)
        else:
            plan.skipped.append((tag, why))
    return plan


def refuse_unusable(save_dir: str | Path, plan: ResumePlan) -> None:
    """Tags present but none usable: refuse rather than start fresh over the user's checkpoints."""
    raise ValueError(f"{checkpoint_root(save_dir)} holds {len(plan.tags)} checkpoint(s) but none is usable "
                     f"({plan.skipped_line()}); to start fresh set train.restart=true (the old checkpoints "
                     "are moved aside, not deleted) or choose another train.save_dir")


def move_aside(save_dir: str | Path) -> Path | None:
    """train.restart=true: keep the old checkpoints under a new name instead of deleting or mixing them."""
    root = checkpoint_root(save_dir)
    if not root.exists():
        return None
    index = 1
    while (target := root.with_name(f"checkpoints.before_restart_{index}")).exists():
        index += 1
    root.rename(target)
    metrics = Path(save_dir) / "metrics.jsonl"
    if metrics.is_file():  # the fresh run rewrites it from step 1: keep the old curve with its checkpoints
        metrics.rename(target / metrics.name)
    return target


def rng_state(tracker: RNGStatesTracker) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "tracker": tracker.state_dict(),
    }


def restore_rng_state(state: dict, tracker: RNGStatesTracker) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tracker.load_state_dict(state["tracker"])


def tags_to_prune(tags: list[str], current: str, keep_last: int, root: Path) -> list[str]:
    """Older tags beyond the newest `keep_last` complete ones (the current tag counts), and older leftovers
    of killed saves. Tags newer than the current one are never touched: they may be the user's real
    checkpoints (a run resumed from an older tag), or be overwritten when the run reaches them."""
    older = [t for t in tags if t < current]
    complete_older = [t for t in older if incomplete_reason(root / t) is None]
    keep = set(complete_older[len(complete_older) - (keep_last - 1):]) if keep_last > 1 else set()
    return [t for t in older if t not in keep]


def save(engine, save_dir: str | Path, step: int, client_state: dict, *, run_config: dict,
         tokenizer_model: str | None, keep_last: int, is_rank0: bool, layout: dict | None = None) -> Path:
    """Save a checkpoint on every rank, then (rank 0) mark it complete, publish it as latest and prune."""
    root = checkpoint_root(save_dir)
    tag = tag_of(step)
    path = root / tag
    if is_rank0 and (path / COMPLETE_NAME).exists():
        (path / COMPLETE_NAME).unlink()  # rewriting a tag (a resumed run reaching it again): not whole until done
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if is_rank0:
        (path / CONFIG_NAME).write_text(json.dumps(run_config, indent=1))
        if layout is not None:  # training/layout.py: how this tag was split, for a resume on another layout
            (path / LAYOUT_NAME).write_text(json.dumps(layout, indent=1))
        if tokenizer_model:
            shutil.copy2(tokenizer_model, path / Path(tokenizer_model).name)
    if dist.is_initialized():
        dist.barrier()
    if is_rank0:
        write_completion_marker(path)
        tmp = root / f"{LATEST}.{os.getpid()}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, root / LATEST)
        for old in tags_to_prune(all_tags(save_dir), tag, keep_last, root):
            shutil.rmtree(root / old, ignore_errors=True)
        for converted in root.glob(f"{TAG_PREFIX}*{UNIVERSAL_SUFFIX}"):
            if converted.name.removesuffix(UNIVERSAL_SUFFIX) < tag:
                shutil.rmtree(converted, ignore_errors=True)
                (root / f"{LATEST}{UNIVERSAL_SUFFIX}").unlink(missing_ok=True)  # DeepSpeed's pointer to it
    if dist.is_initialized():
        dist.barrier()
    return path


def _agree(ok: bool) -> bool:
    """Whether every rank succeeded (a tag is used only if all ranks loaded it)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor(float(ok))
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() >= 1


def load(engine, save_dir: str | Path, *, report, only_tag: str | None = None,
         trust: bool = False) -> tuple[str, dict] | None:
    """Load the newest usable checkpoint into the engine; returns (tag, client state), or None when the
    save directory holds no checkpoint. `report(line)` prints a warning once (rank 0). `only_tag`: load that
    directory under SAVE_DIR/checkpoints and nothing else (a universal conversion of the newest tag). Every
    file of a tag is checked before DeepSpeed unpickles it (file_safety.py; `trust` skips the check): a file
    that would call code is refused (UnsafeCheckpoint), an unreadable one makes the tag fail like a corrupt one."""
    plan = plan_resume(save_dir)
    if only_tag is not None:
        plan = ResumePlan(candidates=[only_tag], tags=plan.tags)
    if not plan.tags:
        if plan.skipped:
            report(f"warning: {plan.skipped_line()}; no checkpoint to resume from, starting fresh")
        return None
    if plan.skipped:
        target = plan.candidates[0] if plan.candidates else "none"
        report(f"warning: skipped checkpoint(s) {plan.skipped_line()}; resuming from {target}")
    failures = []
    for tag in plan.candidates:
        try:
            check_checkpoint_directory(checkpoint_root(save_dir) / tag, trust=trust)
            _, client_state = engine.load_checkpoint(str(checkpoint_root(save_dir)), tag=tag,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
            error = None if client_state is not None else "DeepSpeed found no checkpoint files"
        except UnsafeCheckpoint:
            raise
        except Exception as exc:  # a corrupt file fails in torch.load or DeepSpeed; any rank may see it
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if _agree(error is None):
            return tag, client_state
        failures.append((tag, error or "another rank failed to load it"))
        report(f"warning: checkpoint {tag} failed to load ({failures[-1][1]}); trying an older one")
    plan.skipped += failures
    refuse_unusable(save_dir, plan)
    return None


def pipeline_state_dict(step_dir: Path, config: ModelConfig, tp_rank: int,
                        trust: bool = False) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pipeline checkpoint's per-item files (one TP rank) under BertForPreTraining's
    names, as saved; empty when there are none."""
    from megatron_narrow.model.pipeline import model_key

    state: dict[str, torch.Tensor] = {}
    for file in sorted(step_dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        item = int(PIPELINE_ITEM_FILE.search(file.name).group(1))
        for key, value in load_checkpoint_file(file, trust=trust).items():
            state[model_key(config, item, key)] = value
    return state
