"""A task's training split changed for the study's small-data and label-noise regimes."""

import dataclasses

import numpy as np
import torch

from .task_data import DataError, TaskData

_ALTER_SEED = 271828  # with the run's seed: which examples are kept and which labels flip


def alter_training(data: TaskData, *, examples: int = 0, label_noise: float = 0.0,
                   seed: int = 0) -> TaskData:
    """The task with fewer training examples and/or noisy labels, drawn per seed.

    Args:
        data: the task as `load_task` gives it.
        examples: keep that many training examples of a seeded shuffle (0: all).
        label_noise: replace that share of the training and validation labels (both come from
            the training set) with a different class drawn uniformly; the test split stays.
        seed: the run's seed, which draws the kept examples and the flipped labels.

    Raises:
        DataError: on a text task, or `examples` beyond the training split's size.
    """
    if not examples and not label_noise:
        return data
    if data.kind == "text":
        raise DataError("train_examples and label_noise are for classification tasks; task "
                        f"{data.name} predicts characters")
    rng = np.random.default_rng([_ALTER_SEED, seed])
    x_train, y_train = data.x_train, data.y_train
    if examples:
        if examples > len(y_train):
            raise DataError(f"train_examples {examples} exceeds the {len(y_train):,} training "
                            f"examples of task {data.name}")
        kept = torch.from_numpy(np.sort(rng.permutation(len(y_train))[:examples]))
        x_train, y_train = x_train[kept], y_train[kept]
    y_val = data.y_val
    if label_noise:
        y_train, y_val = (_noisy(y, label_noise, data.num_classes, rng) for y in (y_train, y_val))
    return dataclasses.replace(data, x_train=x_train, y_train=y_train, y_val=y_val)


def _noisy(y: torch.Tensor, share: float, classes: int, rng) -> torch.Tensor:
    """`y` with round(share * len(y)) labels, chosen at random, moved to another class."""
    flipped = rng.permutation(len(y))[:round(share * len(y))]
    shift = rng.integers(1, classes, size=len(flipped))  # never 0: the label really changes
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.from_numpy(shift)) % classes
    return noisy
