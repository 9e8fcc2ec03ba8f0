"""The checkpoint directory's file format, read by training (resume) and by conversion alike.

Layout: SAVE_DIR/checkpoints/step_NNNNNNN/ (DeepSpeed's files, run_config.json, layout.json, tokenizer copy,
and complete.json written last) and SAVE_DIR/checkpoints/latest, a one-line file naming the newest save.
A tag is whole only when its completion marker lists every file with its size and the files match (a kill
mid-save, a partial rsync, a truncated copy all fail that check).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.file_safety import confined, load_checkpoint_file

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


def tags_to_prune(tags: list[str], current: str, keep_last: int, root: Path) -> list[str]:
    """Older tags beyond the newest `keep_last` complete ones (the current tag counts), and older leftovers
    of killed saves. Tags newer than the current one are never touched: they may be the user's real
    checkpoints (a run resumed from an older tag), or be overwritten when the run reaches them."""
    older = [t for t in tags if t < current]
    complete_older = [t for t in older if incomplete_reason(root / t) is None]
    keep = set(complete_older[len(complete_older) - (keep_last - 1):]) if keep_last > 1 else set()
    return [t for t in older if t not in keep]


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
