"""What may change between a checkpoint and the run that resumes it.

A resumed run takes its schedule from the current config (the lr is a pure function of the step), so
a changed lr, warmup, length or decay simply applies from the next step; it is reported in one line so
that nobody wonders. What defines the parameters or the meaning of the data cannot change under a
checkpoint: DeepSpeed would fail deep inside a tensor copy, or worse, train on silently.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXED = {
    "model": ("variant", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "full_length_layers"),
    "data": ("seq_len", "pair_task", "packing", "max_segments"),
}
"""Keys that a checkpoint's tensors or data position depend on; a change is refused (packing: consumed
samples count rows of another kind)."""

BEFORE_THE_KEY = {"model.token_drop_force_keep": "targets"}
"""A key absent from a checkpoint's config compares as the behaviour the code had before the key existed,
so that resuming an old run under a new default is reported."""

SCHEDULE = ("lr", "min_lr", "warmup_steps", "train_steps", "lr_decay")
"""train.* keys of the learning-rate schedule; a change applies from the next step."""


def _flatten(config: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def fixed_keys(sections: dict[str, tuple[str, ...]]) -> set[str]:
    return {f"{section}.{key}" for section, keys in sections.items() for key in keys}


def config_changes(saved: dict, current: dict, fixed: set[str] | None = None) -> tuple[list[str], list[str]]:
    """(refused, changed): `section.key old -> new` for fixed keys that differ (default: pretraining's FIXED), and
    for every other key."""
    old, new = {**BEFORE_THE_KEY, **_flatten(saved)}, _flatten(json.loads(json.dumps(current)))
    fixed = fixed_keys(FIXED) if fixed is None else fixed
    refused, changed = [], []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] != new[key]:
            (refused if key in fixed else changed).append(f"{key} {old[key]} -> {new[key]}")
    return refused, changed


def saved_run_config(tag_dir: Path) -> dict | None:
    path = tag_dir / "run_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_resume_config(tag_dir: Path, current: dict, fixed: set[str] | None = None) -> list[str]:
    """Refuse a resume that changes the model shape, variant, vocabulary or sequence length (or the `fixed`
    section.key names given: fine-tuning's) in one line naming both values; return the other changes for the
    run to report."""
    saved = saved_run_config(tag_dir)
    if saved is None:
        return []
    refused, changed = config_changes(saved, current, fixed)
    if refused:
        raise ValueError(f"cannot resume {tag_dir} with a changed {'; '.join(refused)} (checkpoint -> config): "
                         "restore the checkpoint's values, or start a new run with another train.save_dir or "
                         "train.restart=true")
    return changed
