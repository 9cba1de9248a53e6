"""Training beyond one process: which process this is, the wrapper of the model (DDP, or
FSDP2's fully_shard for `--shard`) and the few collectives the trainer needs. Without torchrun
(WORLD_SIZE unset or 1) every method is a no-op, except under `--shard`, which runs as a world
of one process.

Under DDP every rank computes the same masks from its own replica instead of receiving them:
DDP keeps the replicas bit-identical (the same averaged gradients, the same deterministic
update), so local pruning costs no communication; `check_replicas` verifies that at the end of
each arm. Under FSDP2 each rank holds a dim-0 slice of every parameter and the masks are
computed on the slices (exact sharded thresholds, no gather).
"""

import os

import torch
import torch.distributed as dist


def launched_rank() -> int:
    """This process's rank as torchrun set it (RANK), readable before any process group
    exists; 0 without torchrun."""
    return int(os.environ.get("RANK", "0")) if _launched_size() > 1 else 0


def _launched_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class World:
    def __init__(self, rank: int = 0, size: int = 1, owns_group: bool = False,
                 shard: bool = False):
        self.rank, self.size = rank, size
        self.owns_group = owns_group  # start() made the process group, so close() ends it
        self.shard = shard  # FSDP2 instead of DDP; there is a process group even on one rank

    @property
    def main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device, shard: bool = False) -> tuple["World", torch.device]:
        """Join torchrun's process group (gloo on CPU, nccl on CUDA); on CUDA each process
        takes the GPU of its LOCAL_RANK. `shard` without torchrun makes a group of this one
        process: fully_shard and the sharded checkpoints need one, and a sharded run can so
        resume on a single process. Returns the world and the device to train on."""
        launched = _launched_size() > 1 and dist.is_available()
        if not launched and not shard:
            return cls(), device
        if device.type == "cuda" and launched:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if launched:
                dist.init_process_group(backend)
            else:  # no rendezvous to make: an in-process store serves the one rank
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return cls(dist.get_rank(), dist.get_world_size(), owns_group, shard), device

    def close(self) -> None:
        """End a process group start() made, once every rank is done: a rank that exits with
        its group alive while another still works can abort in the backend's teardown."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to run forward/backward through: under `shard` the model itself, made
        FSDP2 in place (its parameters become DTensors: build the optimizer after this); else
        DDP when there are several ranks."""
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            for unit in shard_units(model):
                fully_shard(unit)
            return fully_shard(model)
        if self.size == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def from_main(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not dist.is_initialized() or self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def first_problem(self, problem: str | None) -> str | None:
        """The first rank's non-None `problem`, on every rank (None if no rank has one): an
        error that one rank finds is raised by all of them together."""
        return next((p for p in self.gather(problem) if p is not None), None)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `tensor` over the ranks."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def check_replicas(self, params) -> None:
        """Raise if the ranks' copies of the parameters are not bit-identical. Under `shard`
        there are no copies: each weight lives on one rank, so nothing can diverge."""
        if self.size == 1 or self.shard:
            return
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().max()])
        spread = torch.stack([fingerprint, -fingerprint])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if not torch.equal(spread[0], -spread[1]):
            raise RuntimeError("DDP replicas diverged: the ranks hold different weights")


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules fully_shard makes units of (each gathered for its own forward, freed after
    it; the root takes what is left): the items of every ModuleList or ModuleDict (a
    transformer's or an MLP's blocks; not looked into further) and the top-level children
    that hold no such list. A module sharing a parameter with a module outside it (an output
    layer tied to the embedding) is left to the root, which then holds both names."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)

    def unit(module, path):
        params = list(module.parameters())
        inside = all(name.startswith(path + ".") for p in params for name in names[id(p)])
        return [module] if params and inside else []

    def has_blocks(module):
        return any(isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))
                   for m in module.modules())

    def blocks(module, prefix, top):
        found = []
        for name, child in module.named_children():
            path = prefix + name
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                for item_name, item in child.named_children():
                    found += unit(item, f"{path}.{item_name}")
            elif has_blocks(child):
                found += blocks(child, path + ".", top=False)
            elif top:
                found += unit(child, path)
        return found

    return blocks(model, "", top=True)
