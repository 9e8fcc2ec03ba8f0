"""Sequence-length phases (data.seq_len_schedule) and Megatron's batch-size ramp-up (train.batch_size_rampup):
the arithmetic of every step's shape, and a real run that crosses a phase boundary and the end of its ramp,
resumed from before both, bit for bit."""

from __future__ import annotations

import pytest

from megatron_narrow.config import RunConfig
from megatron_narrow.training.batch_schedule import BatchSchedule

from .runs import assert_same_weights, losses, pretrain_argv, records, resume_from, run_to_end


def megatron_ramp(consumed: int, start: int, increment: int, samples: int, final: int) -> int:
    """The ramp as Megatron's RampupBatchsizeNumMicroBatches computes it, written out for the test."""
    if consumed > samples:
        return final
    per_increment = samples / ((final - start) // increment)
    return start + int(consumed / per_increment) * increment


def schedule_for(data: dict | None = None, train: dict | None = None, dp: int = 1) -> BatchSchedule:
    return BatchSchedule(RunConfig.from_dict({"data": data or {}, "train": train or {}}), dp)


def test_ramp_and_phases_follow_the_arithmetic():
    schedule = schedule_for({"seq_len": 512, "max_predictions": 80,
                             "seq_len_schedule": [{"until_step": 9, "seq_len": 128, "micro_batch_size": 16}]},
                            {"micro_batch_size": 8, "global_batch_size": 256, "batch_size_rampup": [32, 32, 1000]},
                            dp=2)
    consumed, shapes = 0, []
    for step in range(1, 21):
        shape = schedule.shape(step, consumed)
        assert shape.global_batch_size == megatron_ramp(consumed, 32, 32, 1000, 256), step
        assert shape.micro_batch_size * shape.gradient_accumulation * 2 == shape.global_batch_size
        shapes.append(shape)
        consumed += shape.global_batch_size
    assert [s.seq_len for s in shapes] == [128] * 9 + [512] * 11
    assert [s.max_predictions for s in shapes[:9]] == [20] * 9  # 80 x 128 / 512
    assert {s.phase for s in shapes} == {0, 1}
    assert shapes[0].global_batch_size == 32 and shapes[-1].global_batch_size == 256
    assert schedule.global_batches() == list(range(32, 257, 32))


@pytest.mark.parametrize("data, train, message", [
    ({"seq_len_schedule": [{"until_step": 5, "seq_len": 128}, {"until_step": 5, "seq_len": 256}]}, {},
     "until_step must increase"),
    ({"seq_len_schedule": [{"until_step": 5, "seq_len": 128, "micro": 4}]}, {}, "unknown key(s) micro"),
    ({"seq_len_schedule": [{"seq_len": 128}]}, {}, "no until_step"),
    ({"seq_len_schedule": [{"until_step": 5, "seq_len": 128, "max_predictions": 200}]}, {},
     "max_predictions must be in [1, seq_len=128]"),
    ({}, {"batch_size_rampup": [8, 8]}, "three integers"),
    ({}, {"micro_batch_size": 8, "global_batch_size": 64, "batch_size_rampup": [8, 24, 100]},
     "start plus a whole number of increments"),
    ({"seq_len_schedule": [{"until_step": 5, "seq_len": 128, "micro_batch_size": 16}]},
     {"micro_batch_size": 8, "global_batch_size": 64, "batch_size_rampup": [8, 8, 100]},
     "global batch 8 of train.batch_size_rampup is not a multiple of data.seq_len_schedule[0].micro_batch_size=16"),
])
def test_bad_schedules_are_one_line_naming_the_key(data, train, message):
    with pytest.raises(ValueError) as error:
        schedule_for(data, train)
    assert message in str(error.value) and "\n" not in str(error.value)


RAMP = (4, 4, 16)
STEPS_HERE = 7  # checkpoints at 3, 6 and 7
SCHEDULE = {"data.seq_len_schedule": "[{until_step: 4, seq_len: 128, micro_batch_size: 4}]",
            "train.train_steps": str(STEPS_HERE),
            "data.seq_len": "512", "data.max_predictions": "80", "model.max_position_embeddings": "512",
            "train.micro_batch_size": "2", "train.global_batch_size": "12",
            "train.batch_size_rampup": f"[{', '.join(map(str, RAMP))}]", "train.keep_last": "10"}


def test_a_run_crosses_its_phase_and_ramp_and_resumes_across_them_exactly(tmp_path, tiny_corpus_data):
    """BERT's recipe in small: steps 1-4 at seq_len 128 (micro batch 4), then 512 (micro batch 2); the global
    batch ramps 4 -> 8 -> 12 over the first 16 samples. Resumed from step 3, before both ends, the losses, the
    samples and the weights equal the uninterrupted run's bit for bit."""
    reference = tmp_path / "reference"
    output = run_to_end(pretrain_argv(tiny_corpus_data, reference, "token_drop", **SCHEDULE))
    assert "phase 1/2 from step 1 to step 4: seq_len 128, max_predictions 20, micro batch 4" in output, output[-2000:]
    assert "phase 2/2 from step 5: seq_len 512, max_predictions 80, micro batch 2" in output
    logged = [r for r in records(reference) if "loss" in r]
    consumed, expected_consumed = 0, []
    for _ in range(STEPS_HERE):
        consumed += megatron_ramp(consumed, *RAMP, final=12)
        expected_consumed.append(consumed)
    assert [r["consumed_samples"] for r in logged] == expected_consumed == [4, 8, 16, 28, 40, 52, 64]
    assert [r["global_batch_size"] for r in logged] == [4, 4, 8, 12, 12, 12, 12]
    assert [r["seq_len"] for r in logged] == [128] * 4 + [512] * 3
    expected = losses(reference)
    assert expected[STEPS_HERE] < expected[1]

    resumed = resume_from(reference, tmp_path / "resumed", 3)
    output = run_to_end(pretrain_argv(tiny_corpus_data, resumed, "token_drop", **SCHEDULE))
    assert "resumed from step 3 (16 samples consumed)" in output
    assert "phase 1/2 from step 4 to step 4" in output and "phase 2/2 from step 5" in output
    assert losses(resumed) == expected
    assert records(resumed) and [r["consumed_samples"] for r in records(resumed) if "loss" in r] == expected_consumed
    assert_same_weights(resumed, reference)
