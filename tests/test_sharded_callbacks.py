"""DSD on FSDP2-sharded models (gloo processes on CPU): Lightning's ModelParallelStrategy with
the DSDCallback, and examples/fsdp2_loop.py, the user's own loop with `fully_shard` and
torch.distributed.checkpoint. Masks computed on the shards equal the slices of the masks of
the gathered weights (and, in the loop, those of the same plan run on one process, whose
final weights it follows), the pruned weights and their optimizer state stay exactly 0, and
a checkpoint resumes with exactly its masks on the same and on another world size. Also the
one-line refusals of FSDP version 1 in both callbacks."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsd_kernels as dk
from dsd import Plan
from dsd_kernels.distributed import like_dtensor
from dsd_kernels.optim.masked import SHARDED_MASK

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fsdp2_loop", ROOT / "examples" / "fsdp2_loop.py")
fsdp2_loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsdp2_loop)


@pytest.mark.slow  # two processes, started by Lightning, then one
def test_lightning_model_parallel_prunes_the_shards_and_resumes_from_its_checkpoints(
        tmp_path):
    script = Path(__file__).with_name("_lightning_sharded.py")
    # The pure-torch kernels: two new processes must not each wait for a C++ build.
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=240, env=dict(os.environ, DSD_BACKEND="torch"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {path.name for path in tmp_path.glob("*.done")} == {"rank0.done", "rank1.done"}


def _masks_by_name(dsd):
    masks = dsd.optimizer.masks
    return {name: masks[p].clone() for name, p in dsd.named_prunable if p in masks}


def _check_zeros_kept(dsd):
    """Each pruned weight and its AdamW state exactly 0 on this rank's shard."""
    masks = dsd.optimizer.masks
    for name, p in dsd.named_prunable:
        pruned = ~masks[p]
        assert (dk.local_tensor(p.detach())[pruned] == 0).all(), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert (dk.local_tensor(dsd.optimizer.state[p][key])[pruned] == 0).all(), name


def _loop_worker(rank, world, directory):
    torch.set_num_threads(1)  # two processes on the machine's cores
    dk.use_backend("torch")   # no process waits for a C++ build
    ex = fsdp2_loop
    # The same plan on one process, unsharded, on the whole batches (before the group exists).
    model, optimizer, reference = ex.build(shard=False)
    ex.train(model, optimizer, reference, 0, 5)
    reference_masks = _masks_by_name(reference)
    ex.train(model, optimizer, reference, 5, ex.PLAN.total)
    reference_weights = {name: p.detach() for name, p in reference.named_prunable}
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank,
                            world_size=world)
    checkpoint = f"{directory}/checkpoint"
    model, optimizer, dsd = ex.build()
    ex.train(model, optimizer, dsd, 0, 2)
    ex.save(f"{directory}/dense", model, optimizer, dsd, done=2)  # in the dense phase
    ex.train(model, optimizer, dsd, 2, 4)                     # the dense phase
    whole = [p.full_tensor() for _, p in dsd.named_prunable]  # the weights it prunes
    ex.train(model, optimizer, dsd, 4, 5)                     # prunes, then one sparse step
    expected = dk.magnitude_masks(whole, 0.5)
    for (name, p), mask in zip(dsd.named_prunable, expected):
        assert torch.equal(optimizer.masks[p], mask.chunk(world)[rank]), name
        assert torch.equal(mask, reference_masks[name]), name
    _check_zeros_kept(dsd)
    ex.train(model, optimizer, dsd, 5, 6)
    _check_zeros_kept(dsd)
    ex.save(checkpoint, model, optimizer, dsd, done=6)
    assert not any(SHARDED_MASK in state for state in optimizer.state.values())  # a copy's
    saved_masks = _masks_by_name(dsd)
    saved_weights = {name: p.full_tensor() for name, p in dsd.named_prunable}
    saved_whole_masks = {name: like_dtensor(optimizer.masks[p], p).full_tensor()
                         for name, p in dsd.named_prunable}

    model, optimizer, dsd = ex.build()                        # resume, the same world size
    assert ex.load(checkpoint, model, optimizer, dsd) == 6 and dsd.phase.kind == "sparse"
    resumed = _masks_by_name(dsd)
    assert resumed.keys() == saved_masks.keys() == {"0.weight", "2.weight", "4.weight"}
    assert all(torch.equal(resumed[name], saved_masks[name]) for name in saved_masks)
    for step in range(6, 8):
        ex.train(model, optimizer, dsd, step, step + 1)
        _check_zeros_kept(dsd)
    ex.train(model, optimizer, dsd, 8, ex.PLAN.total)         # re-dense lifts them
    assert not optimizer.masks and dsd.phase.kind == "dense"
    for name, p in dsd.named_prunable:  # as one process, up to the order of float sums
        torch.testing.assert_close(p.full_tensor(), reference_weights[name], rtol=1e-5,
                                   atol=1e-6)
    # A mask that keeps all of rank 0's shard is a mask on every rank when loaded.
    first = dsd.named_prunable[0][1]
    optimizer.set_masks({first: torch.full_like(first.to_local(), rank == 0, dtype=torch.bool)})
    saved_state = optimizer.state_dict()
    optimizer.clear_masks()
    optimizer.load_state_dict(saved_state)
    assert list(optimizer.masks) == [first]
    del model, optimizer, dsd
    dist.barrier()
    dist.destroy_process_group()

    if rank == 0:  # resume on 1 process
        dist.init_process_group("gloo", init_method=f"file://{directory}/init1", rank=0,
                                world_size=1)
        model, optimizer, dsd = ex.build()
        optimizer.load_state_dict(optimizer.state_dict())  # before a step: masks alone
        assert not optimizer.state  # not even empty entries, which pass for a stepped one
        assert ex.load(checkpoint, model, optimizer, dsd) == 6
        for name, p in dsd.named_prunable:
            assert torch.equal(p.full_tensor(), saved_weights[name]), name
            assert torch.equal(optimizer.masks[p], saved_whole_masks[name]), name
        ex.train(model, optimizer, dsd, 6, 8)
        _check_zeros_kept(dsd)
        assert dsd.sparsity() == {name: 0.5 for name in saved_masks}
        model, optimizer, dsd = ex.build()  # unmasked when saved: unmasked when loaded
        assert ex.load(f"{directory}/dense", model, optimizer, dsd) == 2
        assert dsd.phase.kind == "dense" and not optimizer.masks
        del model, optimizer, dsd
        dist.destroy_process_group()
    # A passing rank skips interpreter finalization, where gloo's threads holding FSDP2's
    # tensors can abort the process (as in test_distributed.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow  # two processes, then one
def test_fsdp2_loop_example_keeps_the_masks_through_dcp_on_2_and_1_processes():
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_loop_worker, args=(2, directory), nprocs=2, join=True)


def test_the_lightning_callback_refuses_fsdp_version_1():
    from lightning.pytorch.strategies import FSDPStrategy

    from dsd.integrations.lightning import DSDCallback

    trainer = SimpleNamespace(strategy=FSDPStrategy(), max_epochs=1, max_steps=-1)
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        DSDCallback(Plan.dsd(1, 1, 1)).on_fit_start(trainer, torch.nn.Linear(2, 2))


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_the_transformers_callback_refuses_fsdp_version_1(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from dsd.integrations.transformers import DSDCallback

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0,
                            world_size=1)
    try:
        model = FullyShardedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                         device_id=torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters())
        with pytest.raises(ValueError, match="fsdp_version"):
            DSDCallback(Plan.dsd(1, 1, 1, unit="steps")).on_train_begin(
                None, SimpleNamespace(max_steps=3), None, model=model, optimizer=optimizer)
        assert type(optimizer) is torch.optim.AdamW  # refused before anything changed
    finally:
        dist.destroy_process_group()


def test_masks_a_plain_optimizer_loaded_as_state_are_dropped_when_it_becomes_masked():
    """A plain torch optimizer that loads a masked one's state_dict holding a DTensor
    parameter's mask (as `set_optimizer_state_dict` of a one-file, full checkpoint does) keeps
    it as state; made masked, it drops that entry, and `dsd.resume` recovers the masks from
    the weights."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    optimizer.step()
    state_dict = optimizer.state_dict()
    state_dict["state"][0][SHARDED_MASK] = torch.rand(4, 4) > 0.5
    optimizer.load_state_dict(state_dict)
    assert SHARDED_MASK in optimizer.state[p]
    dk.optim.make_masked_(optimizer)
    assert set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
