"""DSDCallback under Lightning's ModelParallelStrategy (FSDP2 `fully_shard` in configure_model)
on 2 CPU processes (gloo); test_sharded_callbacks.py runs it.

    python tests/_lightning_sharded.py OUT_DIR

Lightning starts rank 1 by running this script again. Each rank checks, and writes
OUT_DIR/rank{r}.done when every check passed:
- the masks are computed on the shards and equal the local slices of the masks one process
  computes on the gathered weights;
- after every optimizer step of a sparse phase the pruned weights and their AdamW state are
  exactly 0 on the shards;
- a fit stopped in the sparse phase saves Lightning's distributed checkpoint (a DCP
  directory), or its one-file checkpoint gathered on rank 0; a new fit from either resumes
  in that phase with exactly the saved masks, and re-dense lifts them;
- then on 1 process, a fit from the DCP checkpoint resumes with the whole saved masks.
"""

import os
import sys

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

import dsd_kernels as dk
from dsd import Plan
from dsd.integrations.lightning import DSDCallback
from dsd_kernels.distributed import like_dtensor

from _lightning_net import BATCHES_PER_EPOCH, PRUNABLE, QUIET, STATE_NAMES, Net, loader

PLAN = Plan.dsd(1, 2, 1, sparsity=0.5)
STEPS = BATCHES_PER_EPOCH // 2  # per epoch on each of the 2 ranks


class ShardedNet(Net):
    def configure_model(self):
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class GatherBeforePruning(L.Callback):
    """The whole weights at the start of each epoch, before DSD's switch (listed first)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights = {name: p.full_tensor() for name, p in pl_module.named_parameters()
                        if name in PRUNABLE}


class Check(L.Callback):
    """Listed after the DSDCallback: checks its masks and the zeros they keep."""

    def __init__(self, dsd_callback, gather):
        self.dsd_callback, self.gather = dsd_callback, gather
        self.sparse_steps, self.last_masks = 0, {}  # the masks at the last sparse step

    def on_train_epoch_start(self, trainer, pl_module):
        dsd = self.dsd_callback.dsd
        if dsd.phase.kind == "sparse" and trainer.current_epoch == 1:  # just pruned
            weights = [self.gather.weights[name] for name in PRUNABLE]
            whole = dk.magnitude_masks(weights, PLAN.phases[1].sparsity)
            for (name, p), mask in zip(dsd.named_prunable, whole):
                local = dsd.optimizer.masks[p]
                assert torch.equal(local, mask.chunk(trainer.world_size)[trainer.global_rank]), \
                    name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dsd = self.dsd_callback.dsd
        masks = dsd.optimizer.masks
        if dsd.phase.kind != "sparse":
            assert not masks, "a dense phase keeps masks"
            return
        for name, p in dsd.named_prunable:
            assert isinstance(p, torch.distributed.tensor.DTensor), name
            pruned = ~masks[p]
            assert pruned.sum() > 0 or pruned.numel() == 0, name
            assert (p.to_local()[pruned] == 0).all(), name
            state = dsd.optimizer.state[p]
            for key in STATE_NAMES["adamw"]:
                assert (state[key].to_local()[pruned] == 0).all(), (name, key)
        self.sparse_steps += 1
        self.last_masks = {name: masks[p].clone() for name, p in dsd.named_prunable}


def fit(epochs, distributed_checkpoint=True, ckpt_path=None, devices=2):
    dsd_callback = DSDCallback(PLAN)
    gather = GatherBeforePruning()
    check = Check(dsd_callback, gather)
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed_checkpoint)
    trainer = L.Trainer(**dict(QUIET, devices=devices, strategy=strategy), max_epochs=epochs,
                        callbacks=[gather, dsd_callback, check])
    trainer.fit(ShardedNet("adamw"), loader(), ckpt_path=ckpt_path)
    return trainer, dsd_callback, check


def stop_and_resume(path, distributed_checkpoint):
    """Stop inside the sparse phase, save, resume on 2 processes; the saved masks, whole."""
    trainer, first, check = fit(2, distributed_checkpoint)  # dense 1, sparse 1 of 2: stops
    assert first.dsd.phase.kind == "sparse" and check.sparse_steps == STEPS, check.sparse_steps
    sparsity = first.dsd.sparsity()  # of the whole tensors, on every rank
    assert sparsity == {name: 0.5 for name in PRUNABLE}, sparsity
    saved = check.last_masks
    whole = {name: like_dtensor(first.dsd.optimizer.masks[p], p).full_tensor()
             for name, p in first.dsd.named_prunable}
    trainer.save_checkpoint(path)
    assert os.path.isdir(path) == distributed_checkpoint  # else one file, gathered on rank 0
    trainer, resumed, check = fit(PLAN.total, distributed_checkpoint, path)
    assert resumed.dsd.phase_index == 2 and check.sparse_steps == STEPS  # one sparse epoch more
    # The sparse epoch after the resume kept exactly the saved masks.
    assert all(torch.equal(check.last_masks[name], saved[name]) for name in PRUNABLE)
    return whole


def main(out_dir):
    L.seed_everything(0, verbose=False)
    whole = stop_and_resume(f"{out_dir}/dcp", distributed_checkpoint=True)  # a DCP directory
    stop_and_resume(f"{out_dir}/full.ckpt", distributed_checkpoint=False)
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    if rank == 0:  # the DCP checkpoint on 1 process: the masks resharded, whole
        os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
        trainer, resumed, check = fit(PLAN.total, ckpt_path=f"{out_dir}/dcp", devices=1)
        assert resumed.dsd.phase_index == 2 and check.sparse_steps == 2 * STEPS
        assert all(torch.equal(check.last_masks[name], whole[name]) for name in PRUNABLE)
    open(f"{out_dir}/rank{rank}.done", "w").close()
    os._exit(0)  # gloo threads holding FSDP2's tensors can abort at interpreter exit


if __name__ == "__main__":
    main(sys.argv[1])
