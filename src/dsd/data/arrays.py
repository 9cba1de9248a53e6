"""Numpy arrays into a task's tensors: int64 labels, inputs standardised on the training split,
and the file stamps the loaders' caches key on."""

import numpy as np
import torch

from .splits import carve_validation
from .task_data import TaskData


def labels(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.int64)


def moments(x: np.ndarray):
    """Scalar mean and std of the training inputs; constant inputs are only centred."""
    mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
    return mean, std or 1.0


def standardised_task(name: str, kind: str, shape: tuple, x, y, x_test, y_test, *,
                      val_fraction: float, source: str) -> TaskData:
    """A 10-class task from its training and test arrays: validation carved from training,
    float32 inputs of one example's `shape`, standardised by the training split's moments."""
    val, train = carve_validation(len(y), val_fraction, name)
    mean, std = moments(x[train])

    def inputs(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(len(a), *shape)

    return TaskData(name, kind, shape, 10, inputs(x[train]), labels(y[train]), inputs(x[val]),
                    labels(y[val]), inputs(x_test), labels(y_test), source=source)


def stamp(paths) -> tuple:
    """What the caches key on besides the path: a rewritten file is read again."""
    return tuple((p.name, s.st_mtime_ns, s.st_size) for p in paths for s in [p.stat()])
