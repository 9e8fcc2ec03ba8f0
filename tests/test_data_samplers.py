"""Distributed pretraining sampler: disjoint, complete rank shares and exact resumption."""

from __future__ import annotations

import itertools

import pytest

from megatron_narrow.data.samplers import DistributedPretrainingSampler


def _batches(total, consumed, mb, rank, size):
    return list(
        DistributedPretrainingSampler(
            total_samples=total,
            consumed_samples=consumed,
            micro_batch_size=mb,
            data_parallel_rank=rank,
            data_parallel_size=size,
        )
    )


def test_single_rank_sequence():
    batches = _batches(10, 0, 3, 0, 1)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the incomplete last step is dropped


@pytest.mark.parametrize("dp", [2, 4])
def test_rank_shares_disjoint_and_cover_the_single_rank_sequence(dp):
    mb, total = 3, 103
    shares = [_batches(total, 0, mb, r, dp) for r in range(dp)]
    steps = total // (mb * dp)
    assert all(len(s) == steps for s in shares)
    flat = [i for s in shares for b in s for i in b]
    assert len(flat) == len(set(flat)) == steps * mb * dp
    # Step by step, ranks in order, the shares are the single-rank stream of the same global batch size.
    single = _batches(total, 0, mb * dp, 0, 1)
    for step in range(steps):
        assert [i for r in range(dp) for i in shares[r][step]] == single[step]
    assert sorted(flat) == list(range(steps * mb * dp))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_resume_continues_exact_sequence(dp):
    mb, total = 2, 200
    for rank in range(dp):
        full = _batches(total, 0, mb, rank, dp)
        for done_steps in (0, 1, 7, len(full)):
            resumed = _batches(total, done_steps * mb * dp, mb, rank, dp)
            assert resumed == full[done_steps:]


def test_endless_stream():
    sampler = DistributedPretrainingSampler(
        total_samples=None, consumed_samples=40, micro_batch_size=4, data_parallel_rank=1, data_parallel_size=2
    )
    batches = list(itertools.islice(sampler, 1000))
    assert batches[0] == [44, 45, 46, 47]
    assert batches[999] == [40 + 999 * 8 + 4 + k for k in range(4)]
    with pytest.raises(TypeError):
        len(sampler)
    assert (
        len(
            DistributedPretrainingSampler(
                total_samples=100, consumed_samples=16, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=2
            )
        )
        == 10
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_parallel_rank": 2, "data_parallel_size": 2}, r"rank must be in \[0, data_parallel_size=2\), got 2"),
        ({"data_parallel_rank": -1}, "data_parallel_rank"),
        ({"data_parallel_size": 0}, "data_parallel_size must be >= 1, got 0"),
        ({"micro_batch_size": 0}, "micro_batch_size must be >= 1, got 0"),
        ({"consumed_samples": -3}, "consumed_samples must be >= 0, got -3"),
        ({"consumed_samples": 101}, "consumed_samples=101 exceeds total_samples=100"),
        ({"total_samples": 0}, "total_samples must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {
        "total_samples": 100,
        "consumed_samples": 0,
        "micro_batch_size": 2,
        "data_parallel_rank": 0,
        "data_parallel_size": 1,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DistributedPretrainingSampler(**args)
