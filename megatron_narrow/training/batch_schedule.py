"""The shape of every step: its sequence-length phase (data.seq_len_schedule) and its global batch
(train.batch_size_rampup, Megatron's ramp-up).

Both are pure functions of the step number and the consumed samples, the two counters a checkpoint holds,
so a resumed run trains each step with the shape the uninterrupted run used.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_narrow.config import RunConfig


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step trains on."""

    phase: int
    """Index into RunConfig.data.phases(): the last is the run's own data.seq_len."""
    seq_len: int
    max_predictions: int
    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation: int
    """Micro-batches per rank in this step."""


class BatchSchedule:
    """Step shapes of one run on `data_parallel` replicas; refuses a schedule some step could not run."""

    def __init__(self, run: RunConfig, data_parallel: int) -> None:
        self.data_parallel = data_parallel
        self.final_batch = run.train.global_batch_size or run.train.micro_batch_size * data_parallel
        self.phase_ends = [phase.until_step for phase in run.data.seq_len_schedule]
        self.phase_data = run.data.phases()
        self.micro_batches = [phase.micro_batch_size or run.train.micro_batch_size
                              for phase in run.data.seq_len_schedule] + [run.train.micro_batch_size]
        self.ramp = run.train.batch_size_rampup
        if self.ramp is not None:
            start, increment, _ = self.ramp
            if start > self.final_batch or (self.final_batch - start) % increment:
                raise ValueError(f"train.batch_size_rampup={self.ramp}: the global batch "
                                 f"{self.final_batch} must be start plus a whole number of increments")
        for index, micro in enumerate(self.micro_batches):
            for batch in self.global_batches():
                if batch % (micro * data_parallel):
                    what = (f"train.global_batch_size={batch}" if batch == self.final_batch
                            else f"global batch {batch} of train.batch_size_rampup")
                    where = (f"data.seq_len_schedule[{index}].micro_batch_size" if index < len(self.phase_ends)
                             else "train.micro_batch_size")
                    raise ValueError(f"{what} is not a multiple of {where}={micro} x data_parallel={data_parallel}; "
                                     "choose sizes that divide every global batch of the run "
                                     f"({', '.join(map(str, self.global_batches()))})")

    def global_batches(self) -> list[int]:
        """Every global batch size the run trains with, smallest first."""
        if self.ramp is None:
            return [self.final_batch]
        start, increment, _ = self.ramp
        return list(range(start, self.final_batch + 1, increment))

    def global_batch(self, consumed_samples: int) -> int:
        """Megatron's ramp: start + increment x (whole increments the consumed samples have passed)."""
        if self.ramp is None:
            return self.final_batch
        start, increment, samples = self.ramp
        increments = (self.final_batch - start) // increment
        if increments == 0 or consumed_samples > samples:
            return self.final_batch
        return min(start + int(consumed_samples / (samples / increments)) * increment, self.final_batch)

    def phase(self, step: int) -> int:
        """The phase of step `step` (1-based)."""
        return next((index for index, end in enumerate(self.phase_ends) if step <= end), len(self.phase_ends))

    def shape(self, step: int, consumed_samples: int) -> StepShape:
        """The shape of step `step` (1-based), which starts after `consumed_samples` global samples."""
        phase = self.phase(step)
        data = self.phase_data[phase]
        micro = self.micro_batches[phase]
        batch = self.global_batch(consumed_samples)
        return StepShape(phase=phase, seq_len=data.seq_len, max_predictions=data.max_predictions,
                         micro_batch_size=micro, global_batch_size=batch,
                         gradient_accumulation=batch // (micro * self.data_parallel))

    def describe(self, shape: StepShape, step: int) -> str:
        """One line announcing the phase that starts at `step`."""
        total = len(self.phase_data)
        until = f" to step {self.phase_ends[shape.phase]}" if shape.phase < len(self.phase_ends) else ""
        return (f"phase {shape.phase + 1}/{total} from step {step}{until}: seq_len {shape.seq_len}, "
                f"max_predictions {shape.max_predictions}, micro batch {shape.micro_batch_size}")
