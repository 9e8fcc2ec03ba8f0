"""Reading files that may come from someone else: checkpoints that cannot run code, paths that stay home.

A torch checkpoint is a pickle, and unpickling may call any function the file names: a shared checkpoint
with one crafted entry runs its payload when it is converted or resumed from. Before any checkpoint file
is loaded (by us, or by DeepSpeed, which loads with `weights_only=False`), the globals its pickle names are
read from the opcodes alone (torch's `get_unsafe_globals_in_checkpoint`: no tensor data, no code) and any
beyond torch's own safe set and `EXTRA_GLOBALS` (what DeepSpeed and our client state write) is refused in
one line. Our own loads then run with `weights_only=True` and those extras registered. `trust=True` (the
tools' --trust-checkpoint, train.trust_checkpoint) skips both, for a file the user vouches for.

Names read from a manifest, an index cache entry or a checkpoint's complete.json are joined to their
directory only through `confined`: no absolute paths, no `..`, no symlink that leads outside.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EXTRA_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.ndarray",  # numpy's RNG state in our client state
    "numpy.dtype",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
)
"""Globals beyond torch's weights_only set that DeepSpeed's and our checkpoints hold (every file the test
suite writes: ZeRO 0-3, bf16/fp16, TP, PP, universal). A dtype class numpy names by its module is matched
by prefix (NUMPY_DTYPE_PREFIX)."""
NUMPY_DTYPE_PREFIX = "numpy.dtypes."
TRUST_HINT = "if you trust this file, pass --trust-checkpoint (tools) or set train.trust_checkpoint=true"


class UnsafeCheckpoint(ValueError):
    """A checkpoint file whose pickle names a global outside the allowlist: loading it could run code."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is not a torch zip archive (truncated, damaged, or the legacy pickle format)."""


def unexpected_globals(path: str | Path) -> list[str]:
    """The globals `path`'s pickle names that neither torch's weights_only loader nor EXTRA_GLOBALS allows."""
    import torch

    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint(f"{path} is not a torch checkpoint archive (truncated, damaged, or saved in "
                                   "the legacy format, which is not read)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # a damaged archive or pickle: reported as such, never unpickled
        raise UnreadableCheckpoint(f"{path}: its pickle cannot be read ({error})") from None
    return [name for name in names if name not in EXTRA_GLOBALS and not name.startswith(NUMPY_DTYPE_PREFIX)]


def check_checkpoint_files(paths: Iterable[str | Path], *, trust: bool = False) -> None:
    """Refuse the first file whose pickle names a global outside the allowlist (one line; see the module)."""
    if trust:
        return
    for path in paths:
        if unexpected := unexpected_globals(path):
            raise UnsafeCheckpoint(f"{path} is refused: its pickle calls {', '.join(unexpected)}, which no checkpoint "
                                   f"of ours or DeepSpeed's holds (loading it could run code); {TRUST_HINT}")


def check_checkpoint_directory(directory: str | Path, *, trust: bool = False) -> None:
    """check_checkpoint_files on every .pt file under `directory` (a tag, a universal conversion)."""
    check_checkpoint_files(sorted(Path(directory).rglob("*.pt")), trust=trust)


def _extra_global_objects() -> list[Any]:
    """The objects EXTRA_GLOBALS names, for torch.serialization.safe_globals (those importable here)."""
    import importlib

    import numpy as np

    objects: list[Any] = [type(np.dtype(name)) for name in ("uint8", "uint32", "int64", "float32", "float64")]
    for qualified in EXTRA_GLOBALS:
        module, _, name = qualified.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # numpy.core vs numpy._core: one of the two exists
            continue
    return objects


def load_checkpoint_file(path: str | Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """torch.load(path) on the CPU with weights_only=True and the allowlist registered (which refuses any other
    global by itself; the check then names it in our one line); trust=True: an unrestricted load."""
    import pickle

    import torch

    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(_extra_global_objects()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        check_checkpoint_files([path])  # raises UnsafeCheckpoint naming the global
        raise


def confined(directory: str | Path, name: str, *, what: str) -> Path:
    """`directory / name` for a `name` read from a file in `directory` (`what` names that file), refused in one
    line when it is absolute, climbs with `..`, or resolves (through a symlink) outside `directory`."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not name:
        raise ValueError(f"{what} names {name!r}, which is not a plain path inside {directory}; refused")
    path = Path(directory) / relative
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise ValueError(f"{what} names {name!r}, which leads outside {directory} (a symlink); refused")
    return path
