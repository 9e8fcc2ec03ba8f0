"""Stopping a run early without losing it: SIGTERM (cluster preemption, `kill`) and Ctrl-C.

The handler only sets a flag; the loop checks it at every step boundary (all ranks agree through an
all-reduce), saves a checkpoint and raises `RunStopped`, which the entry point turns into exit code 75
(EX_TEMPFAIL: not finished, run the same command again to resume). A batch script can requeue on that
code. A second Ctrl-C stops at once, for a user who cannot wait for the save. Installed before the
heavy imports, so a signal during start-up is not lost either.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field

EXIT_STOPPED = 75
"""Exit code of a run stopped early by a signal after its checkpoint was saved (EX_TEMPFAIL)."""


class RunStopped(Exception):
    """The run stopped at a step boundary on a signal, with a checkpoint of that step."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"{signal_name}: checkpoint saved at step {step}; exiting")
        self.step = step


@dataclass
class StopSignal:
    """Records the first SIGTERM or SIGINT; the training loop polls `received`."""

    received: str | None = None
    previous: dict = field(default_factory=dict, repr=False)

    def install(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def stopped(self, step: int) -> RunStopped:
        """The exception that ends the run after its checkpoint at `step` (the signal seen by another rank when
        not by this one)."""
        return RunStopped(self.received or "signal on another rank", step)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received == "SIGINT" and signum == signal.SIGINT:
            print("second interrupt: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        if self.received is None:
            self.received = signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("interrupt: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)
