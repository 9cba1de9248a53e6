"""DSD with FSDP2 in your own training loop: `fully_shard` the model, hand `DSD` the sharded
model and a torch optimizer, and checkpoint with `torch.distributed.checkpoint` (DCP). The
masks are computed on the shards (no gather) and travel in the optimizer's DCP state, so a run
stopped in a sparse phase resumes with the same masks on any number of processes.

    python examples/fsdp2_loop.py    # 2 gloo processes on CPU: 6-16 s on 2 cores, mostly start-up

Each rank trains on its slice of every batch; FSDP2 averages the gradients. The run stops
halfway through the sparse phase, saves a DCP checkpoint, and a new model, optimizer and DSD
take it up from there.
"""

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from dsd import DSD, Plan

PLAN = Plan.dsd(4, 4, 4, sparsity=0.5, unit="steps")  # dense, sparse, re-dense: 4 steps each


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same 12 batches of 16 examples on every rank."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 16, 16, generator=generator)
    return list(zip(x, (x[..., :4].sum(-1) > 0).long() + (x[..., 4:8].sum(-1) > 0).long()))


def build(shard: bool = True):
    """The model (each Linear its own FSDP2 unit, then the root), its optimizer and DSD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    if shard:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)  # the parameters are now DTensors, sharded on dim 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # made after fully_shard
    return model, optimizer, DSD(model, optimizer, PLAN)        # masks the optimizer in place


def train(model, optimizer, dsd, start: int, stop: int) -> None:
    """Steps [start, stop) of the plan, each rank on its slice of the batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for step, (x, y) in enumerate(batches()[start:stop], start):
        dsd.step_start(step)        # prunes the shards entering the sparse phase
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        optimizer.step()            # the masked step, on each rank's local shards


def save(path: str, model, optimizer, dsd, done: int) -> None:
    """A DCP checkpoint: the sharded weights, the optimizer's state with the masks, the
    phase and the plan, and the steps done."""
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": get_optimizer_state_dict(model, optimizer),
              "dsd": dsd.state_dict(), "done": done}, checkpoint_id=path)


def load(path: str, model, optimizer, dsd) -> int:
    """Restore `save`'s checkpoint into a fresh `build()` (any number of ranks); the steps
    done."""
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer),
             "dsd": dsd.state_dict(), "done": 0}
    dcp.load(state, checkpoint_id=path)   # fills `state` in place, resharded for this world
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])  # the masks too
    dsd.load_state_dict(state["dsd"])                               # the phase
    return state["done"]


def run(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    model, optimizer, dsd = build()
    train(model, optimizer, dsd, 0, 6)          # stop halfway through the sparse phase
    save(path, model, optimizer, dsd, done=6)
    model, optimizer, dsd = build()             # a new run takes it up
    done = load(path, model, optimizer, dsd)
    train(model, optimizer, dsd, done, 8)       # the rest of the sparse phase
    sparsity = {name: round(value, 3) for name, value in dsd.sparsity().items()}  # all ranks
    if rank == 0:
        print(f"resumed at step {done} with {len(optimizer.masks)} masks; sparsity at the end "
              f"of the sparse phase: {sparsity}")
    train(model, optimizer, dsd, 8, PLAN.total)  # re-dense
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's threads can still hold FSDP2's tensors there,
    # and releasing them without a live interpreter aborts the process at random.
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    with socket.socket() as free:             # a free port for the rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(run, args=(2, port, os.path.join(directory, "checkpoint")), nprocs=2)


if __name__ == "__main__":
    sys.exit(main())
