"""Resumable distributed sampler: deterministic per (seed, epoch), exact resume on any world size."""

from __future__ import annotations

import pytest

from violet_ds.data.sampler import ResumableDistributedSampler as Sampler


def _epoch(num, world, **kw):
    return [list(Sampler(num, rank, world, **kw)) for rank in range(world)]


def test_deterministic_and_partitioned():
    first = _epoch(103, 4, seed=5)
    assert first == _epoch(103, 4, seed=5)
    flat = [i for part in first for i in part]
    assert len({len(p) for p in first}) == 1 and set(flat) == set(range(103))  # padded to a multiple of 4
    assert len(flat) == 104
    other = Sampler(103, 0, 4, seed=5)
    other.set_epoch(1)
    assert list(other) != first[0]
    assert _epoch(10, 1, shuffle=False)[0] == list(range(10))
    dropped = _epoch(103, 4, seed=5, drop_last=True)
    assert sum(map(len, dropped)) == 100 and len({i for p in dropped for i in p}) == 100


def test_resume_on_other_world_size_is_exact():
    num, batch, seed = 97, 3, 11
    # run 5 steps on 4 ranks
    samplers = [Sampler(num, rank, 4, seed=seed) for rank in range(4)]
    for sampler in samplers:
        sampler.set_epoch(2)
    consumed = []
    iterators = [iter(s) for s in samplers]
    for _ in range(5):
        for iterator in iterators:
            consumed.extend(next(iterator) for _ in range(batch))
    state = samplers[0].state_dict()
    state["cursor"] = 5 * batch * 4
    # resume on 3 ranks
    resumed = [Sampler(num, rank, 3, seed=seed) for rank in range(3)]
    for sampler in resumed:
        sampler.load_state_dict(state)
        sampler.set_epoch(2)  # same epoch: cursor kept
    rest = [list(s) for s in resumed]
    assert sum(len(s) for s in resumed) == sum(map(len, rest))
    everything = consumed + [i for part in rest for i in part]
    # nothing replayed, nothing skipped (up to the padding of the last step)
    assert set(everything) == set(range(num))
    assert len(consumed) + sum(map(len, rest)) - len(set(everything)) <= 3
    assert not set(consumed) & {i for part in rest for i in part[:-1]}
    # a new epoch starts from the beginning
    resumed[0].set_epoch(3)
    assert resumed[0].cursor == 0


def test_state_mismatch_and_bounds():
    sampler = Sampler(10, 0, 2, seed=1)
    with pytest.raises(ValueError, match="20 samples"):
        sampler.load_state_dict({"epoch": 0, "cursor": 0, "num_samples": 20, "seed": 1})
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "cursor": 0, "num_samples": 10, "seed": 2})
    with pytest.raises(ValueError, match="cursor"):
        sampler.set_cursor(11)
    with pytest.raises(ValueError):
        Sampler(10, 2, 2)
    sampler.set_cursor(6)
    assert len(sampler) == 2 and len(list(sampler)) == 2
    sampler.advance(100)
    assert list(sampler) == []
