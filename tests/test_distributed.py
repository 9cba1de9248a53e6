"""Sharded thresholds and masks (gloo, 2-4 processes) equal the single-process result bit
for bit: uneven and empty shards, ties across shard boundaries, both scopes."""

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsd_kernels as dk
from dsd import DSD, Plan

import _oracle

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


def _worker(rank, world, init_file, check, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        dk.use_backend(backend)
        check(rank, world)
        # No rank tears gloo down while a peer's last collective may still be in flight.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A passing rank skips interpreter finalization: gloo's threads can still hold tensors
    # there (FSDP2 keeps its group alive past destroy_process_group), and releasing them
    # without a live interpreter aborts the process at random.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        per_tensor = [max(1, x.numel() // 3) for x in full]
        got = dk.kth_smallest_abs(shards, per_tensor, process_group=group)
        assert torch.equal(got, dk.kth_smallest_abs(full, per_tensor)), (kind, rank)


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


def _check_fsdp2_masked_training(rank, world):
    """FSDP2 parameters: masks from DTensors are the local shards of the masks of the gathered
    weights, and masked SGD on the shards follows a single-process run with the same masks."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    reference = copy.deepcopy(model)
    fully_shard(model)
    opts = [dk.MaskedSGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(8)]

    def train(step_batches):
        for x, y in step_batches:
            for m, opt, (xb, yb) in ((model, opts[0], (x[rank::world], y[rank::world])),
                                     (reference, opts[1], (x, y))):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(xb), yb).backward()
                opt.step()

    train(batches[:4])
    weights = [model[0].weight, model[2].weight]
    local_masks = dk.magnitude_masks(weights, 0.5)
    full_masks = dk.magnitude_masks([w.full_tensor() for w in weights], 0.5)
    for w, local, full in zip(weights, local_masks, full_masks):
        start = min(rank * -(-w.shape[0] // world), w.shape[0])  # FSDP2 shards like chunk()
        assert torch.equal(local, full[start: start + local.shape[0]])
    opts[0].set_masks(dict(zip(weights, local_masks)))
    opts[1].set_masks({reference[0].weight: full_masks[0], reference[2].weight: full_masks[1]})
    train(batches[4:])
    for w, local in zip(weights, local_masks):
        assert (w.to_local()[~local] == 0).all()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)
    # The masks of the zeros: each rank's are those of its own shards, found with no
    # collective, and a masks="zeros" plan reports the whole tensors' sparsity.
    for w, full in zip(weights, full_masks):
        start = min(rank * -(-w.shape[0] // world), w.shape[0])
        assert torch.equal(dk.nonzero_masks(w), full[start: start + w.to_local().shape[0]])
    zeros = DSD(model, opts[0], Plan.sparse(1, masks="zeros"))
    zeros.epoch_start(0)
    assert zeros.found_sparsity == zeros.sparsity() == {"0.weight": 27 / 54, "2.weight": 13 / 27}
    assert all(torch.equal(opts[0].masks[w], mask) for w, mask in zip(weights, local_masks))
    _check_fsdp2_general_masked_steps(rank, world)
    _check_fsdp2_nm_masks(rank, world)


def _check_fsdp2_general_masked_steps(rank, world):
    """torch.optim's own steps between dsd's masking passes (the general masked step), and the
    fused ones, on FSDP2 shards: the pruned weights stay exactly zero. (Rprop's own step
    writes through a boolean index, which DTensors refuse in torch 2.13.)"""
    from torch.distributed.fsdp import fully_shard

    from dsd_kernels.optim import make_masked_

    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "NAdam", "RAdam", "Adamax",
                 "Adadelta", "ASGD"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(),
                                    torch.nn.Linear(9, 3))
        for unit in (model[0], model[2], model):
            fully_shard(unit)
        kwargs = {"momentum": 0.9} if name == "SGD" else {}
        opt = make_masked_(getattr(torch.optim, name)(model.parameters(), lr=0.01, **kwargs))
        weights = [model[0].weight, model[2].weight]
        opt.set_masks(dict(zip(weights, dk.magnitude_masks(weights, 0.5))))
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 6)).square().sum().backward()
            opt.step()
        for w in weights:
            assert (w.to_local()[~opt.masks[w]] == 0).all(), (name, rank)
            assert int((w.full_tensor() == 0).sum()) == dk.pruned_count(0.5, w.numel()), name


def _check_fsdp2_nm_masks(rank, world):
    """DSD's N:M masks of FSDP2 parameters are the local rows of the masks of the whole
    tensors (groups run along dim 1, inside each rank's rows); a tensor whose dim 1 is not a
    multiple of M stays dense."""
    from torch.distributed.fsdp import fully_shard

    from dsd import DSD, Plan

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4),
                                torch.nn.ReLU(), torch.nn.Linear(4, 3))
    whole = {name: p.detach().clone() for name, p in model.named_parameters()}
    for unit in (model[0], model[2], model[4], model):
        fully_shard(unit)
    dsd = DSD(model, dk.MaskedSGD(model.parameters(), lr=0.1),
              Plan.from_lengths([1], first="sparse", pattern="2:4"))
    dsd.epoch_start(0)
    params = dict(model.named_parameters())
    assert sorted(name for name, p in params.items() if p in dsd.optimizer.masks) == \
        ["0.weight", "4.weight"]
    for name in ("0.weight", "4.weight"):
        p = params[name]
        rows = -(-p.shape[0] // world)  # FSDP2 shards like chunk()
        want = dk.nm_masks([whole[name]], "2:4")[0][rank * rows: (rank + 1) * rows]
        assert torch.equal(dsd.optimizer.masks[p], want), (name, rank)
        assert torch.equal(p.full_tensor() != 0, dk.nm_masks([whole[name]], "2:4")[0]), name


def _check_collectives_per_call(rank, world):
    """One all_reduce per radix pass for all tensors together, whatever their number."""
    group = dist.group.WORLD
    calls = []
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}
    for name, collective in real.items():
        setattr(dist, name, lambda *a, _name=name, _real=collective, **kw: calls.append(_name)
                or _real(*a, **kw))
    try:
        for count in (3, 60):
            for dtype, passes in ((torch.float32, 4), (torch.float16, 3), (torch.bfloat16, 2)):
                full = [_oracle.make((count % 5 + 2, 3), dtype, "cpu", "ties", seed=i)
                        for i in range(count)]
                shards = [_shard(x, rank, world, seed=i) for i, x in enumerate(full)]
                for scope in ("layer", "global"):
                    calls.clear()
                    got = dk.magnitude_masks(shards, 0.5, scope, process_group=group)
                    # sizes and NaN flags, one per pass, the tie counts
                    assert calls == ["all_reduce"] * (1 + passes) + ["all_gather"], calls
                    want = dk.magnitude_masks(full, 0.5, scope)
                    assert all(torch.equal(g, _shard(w, rank, world, seed=i))
                               for i, (g, w) in enumerate(zip(got, want)))
                calls.clear()
                dk.kth_smallest_abs(shards, 5, process_group=group)
                assert calls == ["all_reduce"] * (1 + passes)
    finally:
        for name, collective in real.items():
            setattr(dist, name, collective)


def _spawn(check, world, tmp_path, backend="torch"):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), check, backend), nprocs=world,
             join=True)


@pytest.mark.slow  # every test here spawns its ranks as processes
@pytest.mark.parametrize("world, backend", [(2, "torch"), (3, "torch"), (4, "torch"),
                                            (2, "cpp"), (4, "cpp")])
def test_sharded_masks_equal_single_process(world, backend, tmp_path):
    _spawn(_check_masks_and_thresholds, world, tmp_path, backend)


@pytest.mark.slow
def test_one_collective_per_pass_for_any_number_of_tensors(tmp_path):
    _spawn(_check_collectives_per_call, 2, tmp_path, "cpp")


@pytest.mark.slow
def test_fsdp2_masks_and_masked_training(tmp_path):
    _spawn(_check_fsdp2_masked_training, 2, tmp_path)


@pytest.mark.slow
def test_sharded_errors_raise_on_every_rank(tmp_path):
    _spawn(_check_errors_raise_on_every_rank, 3, tmp_path)
