"""Named RNG streams so that dropout differs where it must and matches where it must.

- Inside tensor-split regions (attention probabilities of this rank's heads) each TP rank needs its
  own stream, or the ranks would drop the same pattern on different heads.
- On replicated activations (hidden dropout) every TP rank must drop identically, or the replicas
  drift apart; the default stream, seeded the same on every TP rank, gives that.
- Data-parallel replicas use the same seeds, so a DP run draws the same masks as one process would.
`fork(name)` swaps the global CPU (and CUDA) RNG state for the stream's and back, because torch's
dropout only reads the global generator.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch

TENSOR_PARALLEL_STREAM = "tensor-parallel"
_TP_SEED_OFFSET = 2718


def _clone(state: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    cpu, cuda = state
    return cpu.clone(), None if cuda is None else cuda.clone()


def component_generator(seed: int, component: str) -> torch.Generator:
    """The generator of one component's initial weights ("embeddings", "layer.3", "lm_head", ...), seeded
    from (seed, component) alone: a layer starts with the same values whether the whole model is built or
    only the pipeline stage that holds it (and, as parallel layers slice a master weight, at any TP)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{component}".encode()))


class RNGStatesTracker:
    """Holds named RNG states; one tracker per model, never global."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def for_model(cls, seed: int, *, tensor_rank: int, pipeline_rank: int = 0) -> RNGStatesTracker:
        """Seed the default stream (same on every TP and DP rank of a stage) and the TP-split stream."""
        default_seed = seed + 100 * pipeline_rank
        torch.manual_seed(default_seed)
        tracker = cls()
        tracker.add(TENSOR_PARALLEL_STREAM, default_seed + _TP_SEED_OFFSET + tensor_rank)
        return tracker

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(seed)
            self._states[name] = self._capture()

    def state_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return {name: _clone(state) for name, state in self._states.items()}

    def load_state_dict(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self._states = {name: _clone(state) for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_STREAM) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added")
        outer = self._capture()
        self._restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._capture()
            self._restore(outer)

    @staticmethod
    def _cuda_devices() -> list[int]:
        # is_available, not is_initialized: a lazily seeded CUDA generator would otherwise keep the last
        # stream's seed, and the TP stream would never switch the CUDA generator
        return [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def _capture(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state() if self._cuda_devices() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _restore(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
