"""Data-parallel training under torchrun: which process this is, and the few collectives the
trainer needs. Without torchrun (WORLD_SIZE unset or 1) every method is a no-op.

Every rank computes the same masks from its own replica instead of receiving them: DDP keeps
the replicas bit-identical (the same averaged gradients, the same deterministic update), so
local pruning costs no communication; `check_replicas` verifies that at the end of each arm.
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
    def __init__(self, rank: int = 0, size: int = 1, owns_group: bool = False):
        self.rank, self.size = rank, size
        self.owns_group = owns_group  # start() made the process group, so close() ends it

    @property
    def main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> tuple["World", torch.device]:
        """Join torchrun's process group (gloo on CPU, nccl on CUDA); on CUDA each process
        takes the GPU of its LOCAL_RANK. Returns the world and the device to train on."""
        if _launched_size() <= 1 or not dist.is_available():
            return cls(), device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns_group), device

    def close(self) -> None:
        """End a process group start() made, once every rank is done: a rank that exits with
        its group alive while another still works can abort in the backend's teardown."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to run forward/backward through: DDP when there are several ranks."""
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

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `tensor` over the ranks."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def check_replicas(self, params) -> None:
        """Raise if the ranks' copies of the parameters are not bit-identical."""
        if self.size == 1:
            return
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().max()])
        spread = torch.stack([fingerprint, -fingerprint])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if not torch.equal(spread[0], -spread[1]):
            raise RuntimeError("DDP replicas diverged: the ranks hold different weights")
