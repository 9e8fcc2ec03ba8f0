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
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_narrow.file_safety import UnsafeCheckpoint, check_checkpoint_directory
from megatron_narrow.formats.checkpoint_files import (
    COMPLETE_NAME,
    CONFIG_NAME,
    LATEST,
    LAYOUT_NAME,
    TAG_PREFIX,
    UNIVERSAL_SUFFIX,
    ResumePlan,
    all_tags,
    checkpoint_root,
    refuse_unusable,
    tag_of,
    tags_to_prune,
    write_completion_marker,
)
from megatron_narrow.parallel import RNGStatesTracker


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


def load(engine, save_dir: str | Path, plan: ResumePlan, *, report, only_tag: str | None = None,
         trust: bool = False) -> tuple[str, dict] | None:
    """Load the newest usable checkpoint of `plan` (plan_resume of `save_dir`, read once at set-up) into the
    engine; returns (tag, client state), or None when the save directory holds no checkpoint. `report(line)`
    prints a warning once (rank 0). `only_tag`: load that directory under SAVE_DIR/checkpoints and nothing else
    (a universal conversion of the newest tag). Every file of a tag is checked before DeepSpeed unpickles it
    (file_safety.py; `trust` skips the check): a file that would call code is refused (UnsafeCheckpoint), an
    unreadable one makes the tag fail like a corrupt one."""
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
