"""One training epoch of an arm, and the clock of its optimizer steps."""

import contextlib
import math
import time

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import batches
from ..world import World
from .compute import autocast, to_device
from .evaluate import losses


def train_epoch(arm, epoch: int, data, x_train, y_train, config: RunConfig, device,
                world: World, *, bars: bool) -> tuple[float, float, float, float]:
    """Train `arm` for epoch `epoch` on (x_train, y_train), the training split on the device
    (or in CPU memory, for batch workers). Returns the train loss and accuracy over the epoch's
    predictions, the seconds of the epoch's training loop and the seconds of its optimizer
    steps."""
    began = time.perf_counter()
    epoch_batches = batches.EpochBatches(
        data, x_train, y_train, seed=config.seed, epoch=epoch, batch_size=config.batch_size,
        rank=world.rank, ranks=world.size)
    feed = batches.loader(epoch_batches, workers=config.workers,
                          pin_memory=device.type == "cuda")
    arm.net.train()
    clock = _StepClock(device)
    stats = torch.zeros(2, device=device)  # loss sum, correct count
    per_example, ranks = math.prod(data.y_train.shape[1:]), world.size  # text: seq_len
    for x, y, weight, size in tqdm(feed, desc=f"epoch {epoch + 1}", disable=not bars,
                                   leave=False, unit="batch"):
        x, y = to_device(x, config, device), y.to(device, non_blocking=True)
        with autocast(config, device):
            logits = arm.net(x)
            batch_losses, correct = losses(logits, y)
        arm.optimizer.zero_grad(set_to_none=True)
        # The loss is scaled so that the mean over ranks (DDP's all-reduce, FSDP2's
        # reduce-scatter under --shard) is the gradient of the global batch's mean loss (a
        # rank left without examples runs one with weight 0).
        loss = batch_losses.sum() * (weight * ranks / (size * per_example))
        (arm.scaler.scale(loss) if arm.scaler else loss).backward()
        with clock.timing():  # the masked optimizer's share of the step
            if arm.scaler:
                arm.scaler.step(arm.optimizer)
                arm.scaler.update()
            else:
                arm.optimizer.step()
        stats += weight * torch.stack([batch_losses.detach().sum(), correct.float()])
    loss_sum, correct = world.sum_(stats).tolist()
    predictions = len(data.y_train) * per_example
    return (loss_sum / predictions, correct / predictions, time.perf_counter() - began,
            clock.total())


class _StepClock:
    """Seconds spent in the optimizer's step over an epoch. On CUDA the step is timed on the
    stream with events: a host clock would see only the kernel launches."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds, self.events = 0.0, []

    @contextlib.contextmanager
    def timing(self):
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began

    def total(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        return self.seconds
