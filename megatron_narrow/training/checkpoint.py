"""Checkpoints through DeepSpeed, plus what DeepSpeed does not know: data position, RNG states, our config.

Layout: SAVE_DIR/checkpoints/step_NNNNNNN/ (DeepSpeed's files, run_config.json, tokenizer copy) and
SAVE_DIR/checkpoints/latest, a one-line file naming the newest complete checkpoint. `latest` is
replaced atomically only after every rank has finished writing, so a kill in the middle of a save
leaves the previous checkpoint the one that loads.
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

from megatron_narrow.parallel import RNGStatesTracker

LATEST = "latest"
CONFIG_NAME = "run_config.json"


def checkpoint_root(save_dir: str | Path) -> Path:
    return Path(save_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(save_dir: str | Path) -> str | None:
    marker = checkpoint_root(save_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (checkpoint_root(save_dir) / tag).is_dir() else None


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
         tokenizer_model: str | None, keep_last: int, is_rank0: bool) -> Path:
    """Save a checkpoint on every rank, then (rank 0) publish it as latest and prune old ones."""
    root = checkpoint_root(save_dir)
    tag = tag_of(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    path = root / tag
    if is_rank0:
        (path / CONFIG_NAME).write_text(json.dumps(run_config, indent=1))
        if tokenizer_model:
            shutil.copy2(tokenizer_model, path / Path(tokenizer_model).name)
    if dist.is_initialized():
        dist.barrier()
    if is_rank0:
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag + "\n")
        os.replace(tmp, root / LATEST)
        tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
        newer = [t for t in tags if t > tag]  # left half-written by a save that was killed
        older = [t for t in tags if t <= tag]
        for old in newer + older[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load(engine, save_dir: str | Path) -> dict | None:
    """Load the latest checkpoint into the engine; returns its client state, or None when there is none."""
    tag = latest_tag(save_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(checkpoint_root(save_dir)), tag=tag,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"checkpoint {tag} in {save_dir} could not be loaded")
    return client_state
