"""InfiniteShardedSampler: one global stream, sharded by rank, resumable at any position."""

import itertools
import time

import pytest
import torch
from torch.utils.data import DataLoader

from dinotrain.data import InfiniteShardedSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = _take(InfiniteShardedSampler(10, seed=0), 30)
    epochs = [stream[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3 and epochs[0] != list(range(10))


def test_seed_changes_order_and_no_shuffle_is_identity():
    assert _take(InfiniteShardedSampler(50, seed=0), 50) != _take(InfiniteShardedSampler(50, seed=1), 50)
    assert _take(InfiniteShardedSampler(5, shuffle=False), 12) == [0, 1, 2, 3, 4] * 2 + [0, 1]


def test_rank_streams_are_disjoint_and_cover_each_epoch():
    size, world = 12, 3
    samplers = [InfiniteShardedSampler(size, seed=4, rank=r, world_size=world) for r in range(world)]
    per_rank = [_take(s, 2 * size // world) for s in samplers]
    for epoch in range(2):
        chunk = [i for stream in per_rank for i in stream[epoch * 4 : (epoch + 1) * 4]]
        assert sorted(chunk) == list(range(size))


def test_ranks_interleave_into_the_single_rank_stream():
    size, world, n = 13, 2, 40  # odd size: rank boundaries drift across epochs
    single = _take(InfiniteShardedSampler(size, seed=2), world * n)
    ranks = [_take(InfiniteShardedSampler(size, seed=2, rank=r, world_size=world), n) for r in range(world)]
    assert [ranks[k % world][k // world] for k in range(world * n)] == single


@pytest.mark.parametrize("start", [0, 1, 7, 13, 26, 50])
def test_resume_from_start_equals_tail_of_uninterrupted_stream(start):
    full = _take(InfiniteShardedSampler(13, seed=5), 100)
    assert _take(InfiniteShardedSampler(13, seed=5, start=start), 100 - start) == full[start:]


def test_resume_onto_a_different_world_size_continues_the_same_global_stream():
    size, batch = 11, 3
    full = _take(InfiniteShardedSampler(size, seed=9), 200)
    consumed = 5 * batch * 2  # 5 iterations on 2 ranks
    world = 3
    samplers = [InfiniteShardedSampler(size, seed=9, rank=r, world_size=world, start=consumed) for r in range(world)]
    ranks = [_take(s, 20) for s in samplers]
    assert [ranks[k % world][k // world] for k in range(60)] == full[consumed : consumed + 60]


def test_large_start_is_fast_and_consistent():
    size = 1000
    start = 10**9 + 7
    began = time.perf_counter()
    tail = _take(InfiniteShardedSampler(size, seed=3, start=start, rank=1, world_size=4), 500)
    assert time.perf_counter() - began < 0.5
    epoch, offset = divmod(start, size)
    sampler = InfiniteShardedSampler(size, seed=3)
    stream = torch.cat([sampler.epoch_order(epoch), sampler.epoch_order(epoch + 1), sampler.epoch_order(epoch + 2)])
    assert tail == stream[offset + 1 :: 4][:500].tolist()


def test_world_size_larger_than_dataset():
    single = _take(InfiniteShardedSampler(3, seed=0), 40)
    ranks = [_take(InfiniteShardedSampler(3, seed=0, rank=r, world_size=8), 5) for r in range(8)]
    assert [ranks[k % 8][k // 8] for k in range(40)] == single


def test_works_as_dataloader_sampler():
    loader = DataLoader(list(range(10)), batch_size=4, sampler=InfiniteShardedSampler(10, shuffle=False))
    batches = list(itertools.islice(loader, 3))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"start": -1}, "start"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfiniteShardedSampler(**{"dataset_size": 10, **kwargs})
