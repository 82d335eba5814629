"""Sharding follows DistributedSampler; evaluation scores every image exactly once at any world size."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from job import data, synthetic
from job.distributed import Runtime
from job.scoring import evaluate


def test_shards_are_disjoint_complete_and_reshuffled_per_epoch():
    n, world, seed = 1003, 4, 7
    shards = [data.epoch_indices(n, seed, 0, r, world) for r in range(world)]
    flat = torch.cat(shards)
    assert all(len(s) == n // world for s in shards)
    assert len(set(flat.tolist())) == len(flat) == (n // world) * world  # disjoint; the tail of 3 is dropped
    assert flat.min() >= 0 and flat.max() < n
    next_epoch = torch.cat([data.epoch_indices(n, seed, 1, r, world) for r in range(world)])
    assert not torch.equal(flat, next_epoch)
    assert torch.equal(flat, torch.cat([data.epoch_indices(n, seed, 0, r, world) for r in range(world)]))
    assert not torch.equal(flat, torch.cat([data.epoch_indices(n, seed + 1, 0, r, world) for r in range(world)]))


def steps_of(n: int, seed: int, epoch: int, world: int, batch: int) -> list[set[int]]:
    """The images of each global step of one epoch at this world size (the training loop's slicing)."""
    per_rank = batch // world
    orders = [data.epoch_indices(n, seed, epoch, r, world) for r in range(world)]
    steps = len(orders[0]) // per_rank
    return [{i for o in orders for i in o[s * per_rank:(s + 1) * per_rank].tolist()} for s in range(steps)]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2), (1, 4)])
def test_an_epoch_resumed_at_another_world_size_takes_the_images_not_yet_seen(before, after):
    n, batch, stopped = 1003, 64, 5
    first, second = steps_of(n, 7, 3, before, batch), steps_of(n, 7, 3, after, batch)
    assert len(first) == len(second) == n // batch  # steps per epoch do not depend on the world size
    assert first[:stopped] == second[:stopped]  # each step takes the same images at any world size
    seen = set().union(*first[:stopped], *second[stopped:])
    assert len(seen) == len(first) * batch  # the rest of the epoch: no image twice, none skipped


def test_same_order_as_distributed_sampler():
    sampler = DistributedSampler(range(500), num_replicas=3, rank=1, shuffle=True, seed=5, drop_last=True)
    sampler.set_epoch(4)
    assert data.epoch_indices(500, 5, 4, 1, 3).tolist() == list(sampler)


def test_eval_shards_cover_each_index_once():
    for n, world in [(10000, 3), (7, 3), (2, 5), (10, 1)]:
        covered = [i for r in range(world) for i in range(n)[data.eval_shard(n, r, world)]]
        assert covered == list(range(n))


class LabelReader(nn.Module):
    """Predicts the class written into pixel (0, 0) of the red channel: a model whose answers are known."""

    def forward(self, x):
        pixel = x[:, 0, 0, 0] * data.STD[0] * 255 + data.MEAN[0] * 255  # undo normalize()
        cls = (pixel / 20).round().long().clamp(0, 9)
        return nn.functional.one_hot(cls, 10).float() * 5


def fixed_set(n: int = 10000):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    predicted = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(0, 10, (n,), generator=g), labels)
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = (predicted * 20).to(torch.uint8)
    return images, labels, predicted


def _worker(rank: int, world: int, store_path: str, results: dict):
    torch.set_num_threads(1)  # three ranks on two cores (torch is imported before this runs: OMP_NUM_THREADS is late)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        images, labels, _ = fixed_set()
        runtime = Runtime(rank, rank, world, world, 1, torch.device("cpu"), "gloo")
        scores = evaluate(LabelReader(), images, labels, runtime, batch_size=999)
        results[rank] = (scores.count, scores.confusion, scores.loss)
        # different per-rank batch counts must not hang: batch_size 1 on a 7-image set
        tiny = evaluate(LabelReader(), images[:7], labels[:7], runtime, batch_size=1)
        results[f"tiny{rank}"] = tiny.count
    finally:
        dist.destroy_process_group()
    # A process that ran gloo collectives here sometimes aborts in the interpreter's own exit, after
    # destroy_process_group returned ("terminate called without an active exception": 2 of ~220 runs of this
    # worker, every rank's marker past the destroy; once in CI). The results are in: leave without that teardown.
    os._exit(0)


@pytest.mark.parametrize("world", [3])
def test_distributed_evaluation_is_exact(tmp_path, world):
    images, labels, predicted = fixed_set()
    expected = torch.zeros(10, 10, dtype=torch.int64)
    expected.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / "store"), results), nprocs=world)
        results = dict(results)
    for rank in range(world):
        count, confusion, loss = results[rank]
        assert count == 10000 and results[f"tiny{rank}"] == 7
        assert torch.equal(confusion, expected)
    accuracy = float(expected.diag().sum()) / 10000
    assert 0.7 < accuracy < 0.8  # a set whose answer is not trivial
    runtime = Runtime(0, 0, 1, 1, 1, torch.device("cpu"), "gloo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        single = evaluate(LabelReader(), images, labels, runtime, batch_size=4096)
    finally:
        dist.destroy_process_group()
    assert single.accuracy == accuracy and abs(single.loss - results[0][2]) < 1e-6  # float32 per-batch sums


def test_augment_crops_flips_and_keeps_dtype():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    x = x.repeat(256, 1, 1, 1)
    out = data.augment(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert not torch.equal(out, x)
    # every output is a shifted (and maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x[:1], (4, 4, 4, 4))[0]
    windows = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    windows += [w.flip(2) for w in windows]
    assert any(torch.equal(out[0], w) for w in windows)
    same = data.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)  # a pure function of the generator's seed
    holes = data.augment(x, torch.Generator().manual_seed(0), cutout=8)  # the same crops and flips, then the holes
    mean = torch.tensor([round(m * 255) for m in data.MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    changed = (holes != out).any(1)
    assert changed.any() and ((holes == mean).all(1) | ~changed).all()  # every changed pixel is the mean


def test_synthetic_source_is_deterministic_and_balanced():
    x1, y1 = synthetic.first(2000, seed=1)
    x2, y2 = synthetic.first(2000, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.uint8 and x1.shape == (2000, 3, 32, 32)
    assert torch.bincount(y1, minlength=10).min() > 150
    assert not torch.equal(synthetic.first(2000, seed=2)[0], x1)
    x5, y5 = synthetic.first(5000, seed=1)  # made in chunks of 4096
    assert torch.equal(x5[:2000], x1) and torch.equal(y5[:2000], y1)
    picked = torch.tensor([4999, 3, 4096, 4095, 3])  # any order, repeats: image i depends on (seed, i) alone
    x3, y3 = synthetic.make(picked, seed=1)
    assert torch.equal(x3, x5[picked]) and torch.equal(y3, y5[picked])
    assert synthetic.make(torch.tensor([], dtype=torch.int64), seed=1)[0].shape == (0, 3, 32, 32)
