"""Sharded thresholds and masks (gloo, 2-4 processes) equal the single-process result bit
for bit: uneven and empty shards, ties across shard boundaries, both scopes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _oracle
import dsd_kernels as dk

SHAPES = [(7, 5), (1, 3), (13,), (4, 3, 2), (2,)]
KINDS = ["normal", "ties", "equal", "close"]
SPARSITIES = [0.0, 0.3, 0.5, 0.9]


def _full_tensors(kind):
    dtypes = [torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float32]
    return [_oracle.make(shape, dtype, "cpu", kind, seed=i)
            for i, (shape, dtype) in enumerate(zip(SHAPES, dtypes))]


def _bounds(rows, world, seed):
    """Uneven dim-0 shard boundaries, some shards empty, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, rows + 1, (world - 1,), generator=gen).tolist())
    return [0] + cuts + [rows]


def _shard(x, rank, world, seed):
    bounds = _bounds(x.shape[0], world, seed)
    return x[bounds[rank]: bounds[rank + 1]]


def _worker(rank, world, init_file, check):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        dk.use_backend("torch")
        check(rank, world)
    finally:
        dist.destroy_process_group()


def _check_masks_and_thresholds(rank, world):
    group = dist.group.WORLD
    for kind in KINDS:
        full = _full_tensors(kind)
        shards = [_shard(x, rank, world, seed=i + world) for i, x in enumerate(full)]
        for scope in ("layer", "global"):
            for sparsity in SPARSITIES:
                want = dk.magnitude_masks(full, sparsity, scope)
                got = dk.magnitude_masks(shards, sparsity, scope, process_group=group)
                for i, (g, w) in enumerate(zip(got, want)):
                    expected = _shard(w, rank, world, seed=i + world)
                    assert torch.equal(g, expected), (kind, scope, sparsity, i, rank)
        total = sum(x.numel() for x in full)
        for k in (1, 2, total // 2, total):
            got = dk.kth_smallest_abs(shards, k, process_group=group)
            want = dk.kth_smallest_abs(full, k)
            assert got.dtype == want.dtype and got.item() == want.item(), (kind, k, rank)


def _check_errors_raise_on_every_rank(rank, world):
    group = dist.group.WORLD
    full = _full_tensors("normal")
    shards = [_shard(x, rank, world, seed=i) for i, x in enumerate(full)]
    if rank == world - 1 and shards[2].numel():
        shards[2][0] = float("nan")
    elif rank == world - 1:
        shards[2] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match=r"xs\[2\] \('c'\) contains NaN or Inf on 1 rank"):
        dk.magnitude_masks(shards, 0.5, process_group=group, names=list("abcde"))
    shards = [_shard(x, rank, world, seed=i) for i, x in enumerate(_full_tensors("normal"))]
    total = sum(x.numel() for x in full)
    with pytest.raises(ValueError, match=rf"k must be in \[1, {total}\]"):
        dk.kth_smallest_abs(shards, total + 1, process_group=group)


def _spawn(check, world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), check), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_masks_equal_single_process(world, tmp_path):
    _spawn(_check_masks_and_thresholds, world, tmp_path)


def test_sharded_errors_raise_on_every_rank(tmp_path):
    _spawn(_check_errors_raise_on_every_rank, 3, tmp_path)
