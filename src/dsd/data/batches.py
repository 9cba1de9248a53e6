"""The training batches of one epoch, as one rank sees them.

The order of the examples depends only on (seed, epoch), and each global batch's augmentation
only on (seed, epoch, batch): both arms of a run, a resumed run, any number of ranks and any
number of DataLoader workers see the same examples, augmented the same way. Each rank prepares
only its share of each global batch (every ranks-th example), the part DistributedSampler plays
in a plain DDP script, so the global batch is the same on any world size.
"""

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset

from . import augment

CROP_PADDING = 4  # the CIFAR convention (He et al. 2016)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The CPU generator of one global batch's augmentation."""
    digest = hashlib.blake2b(f"{seed},{epoch},{batch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest) >> 1)  # 63 bits: any torch


class EpochBatches(Dataset):
    """Item i: this rank's share of global batch i, as (x, y, weight, size of the global
    batch). A rank left without
    examples (a last batch smaller than the world) gets one example with weight 0: DDP needs
    every rank to run each step."""

    def __init__(self, data, x: torch.Tensor, y: torch.Tensor, *, seed: int, epoch: int,
                 batch_size: int, rank: int = 0, ranks: int = 1):
        self.x, self.y = x, y
        self.augment, self.fill = data.augment, data.fill
        self.seed, self.epoch, self.rank, self.ranks = seed, epoch, rank, ranks
        order = epoch_order(seed, epoch, len(y))
        self.batches = list(order.split(batch_size))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        index = self.batches[i]
        share, weight = slice(self.rank, None, self.ranks), 1.0
        if self.rank >= len(index):
            share, weight = slice(0, 1), 0.0
        local = index[share].to(self.x.device)
        x = self.x[local]
        if self.augment:
            offsets = augment.draw(batch_generator(self.seed, self.epoch, i), len(index),
                                   CROP_PADDING)
            x = augment.apply(x, [o[share] for o in offsets], padding=CROP_PADDING,
                              fill=self.fill)
        return x, self.y[local], weight, len(index)


def loader(batches: EpochBatches, *, workers: int, pin_memory: bool) -> DataLoader:
    """The epoch's batches in order; with workers, prepared in that many processes ahead of
    the training step (each item is a whole batch: batch_size=None)."""
    # The loader draws its workers' base seed from `generator` (else from torch's global RNG,
    # which dropout uses); the batches take no randomness from the workers' seeds.
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory and workers > 0, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(0))
