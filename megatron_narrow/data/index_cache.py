"""Sample indices built once and memory-mapped by every rank (Megatron's cached .npy indices, in Python).

A cache entry is a directory `<cache_dir>/<name>-<key>/` of .npy files plus `complete.json` (each file's
size), written in a private temporary directory and renamed into place in one step: a reader sees either
no entry or a whole one. The key hashes everything the arrays depend on (the dataset manifest, the
documents of the split, the sample-cutting settings, the seed, FORMAT_VERSION), so a changed input gets a
new entry and an old one is never read for it. An entry whose files do not match its `complete.json`
(truncated by a full disk, damaged by hand) is moved aside and rebuilt.

Two processes that build the same entry at once (ranks on nodes without a shared filesystem, or a race)
write the same bytes; the first rename wins and the other discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_narrow.data.shards import temp_path
from megatron_narrow.file_safety import confined

FORMAT_VERSION = 1
_COMPLETE = "complete.json"


def cache_key(fields: dict) -> str:
    """A short stable hash of JSON-serialisable `fields` (numpy arrays hashed by their bytes)."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        value = fields[name]
        if isinstance(value, np.ndarray):
            value = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest() + str(value.dtype)
        digest.update(json.dumps([name, value], sort_keys=True, default=str).encode())
    digest.update(str(FORMAT_VERSION).encode())
    return digest.hexdigest()[:20]


def open_entry(entry: Path) -> dict[str, np.ndarray] | None:
    """The entry's arrays, memory-mapped read-only; None if it is absent or does not match complete.json. A
    complete.json naming a file outside the entry is refused (ValueError)."""
    marker = entry / _COMPLETE
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    paths = {name: confined(entry, name, what=str(marker)) for name in files}
    try:
        if any(paths[name].stat().st_size != size for name, size in files.items()):
            return None
        return {Path(name).stem: np.load(path, mmap_mode="r") for name, path in paths.items()}
    except (OSError, ValueError):
        return None


def write_entry(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as the entry, atomically; if another process got there first, keep theirs."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(entry)
    staging.mkdir()
    try:
        files = {}
        for name, array in arrays.items():
            path = staging / f"{name}.npy"
            np.save(path, np.ascontiguousarray(array))
            files[path.name] = path.stat().st_size
        (staging / _COMPLETE).write_text(json.dumps({"files": files, "format_version": FORMAT_VERSION}))
        try:
            os.rename(staging, entry)
        except OSError:
            if open_entry(entry) is None:  # neither ours nor a whole one: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_or_build(entry: Path, build: Callable[[], dict[str, np.ndarray]],
                  report: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """The cached arrays of `entry`, building and writing them first if the entry is absent or damaged."""
    arrays = open_entry(entry)
    if arrays is not None:
        return arrays
    if entry.exists():  # damaged: keep it for inspection, out of the way
        aside = entry.parent / f".{entry.name}.damaged.{uuid.uuid4().hex[:8]}"
        os.replace(entry, aside)
        if report is not None:
            report(f"warning: the sample index cache {entry} was damaged (moved to {aside.name}); rebuilding it")
    write_entry(entry, build())
    arrays = open_entry(entry)
    if arrays is None:
        raise OSError(f"the sample index cache {entry} could not be read back after writing it")
    return arrays


def load_or_save_array(path: Path, build: Callable[[], np.ndarray], length: int) -> np.ndarray:
    """A single cached int array (an epoch's order), memory-mapped; built and saved atomically if `path` is
    missing or not `length` long. Concurrent writers write the same bytes, so the last rename is as good."""
    try:
        array = np.load(path, mmap_mode="r")
        if array.shape == (length,):
            return array
    except (OSError, ValueError):
        pass
    staging = temp_path(path)
    with open(staging, "wb") as f:
        np.save(f, build())
    os.replace(staging, path)
    return np.load(path, mmap_mode="r")
