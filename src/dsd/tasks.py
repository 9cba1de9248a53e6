"""The embedded tasks: data generated or shipped locally, never downloaded.

- "mnist1d": MNIST-1D (Greydanus 2020), 10 classes of 40-sample 1-D signals, generated
  procedurally by the `mnist1d` package (its `make_dataset`, not `get_dataset`, which may
  download a pickle). Small MLPs overfit it, so it separates methods that small data hides.
- "digits": scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).

Each task gives train / validation / test tensors; the validation split is carved from the
training set with a fixed seed (choose hyper-parameters on it, never on the test set).
"""

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch

TASKS = ("mnist1d", "digits")
_SPLIT_SEED = 12345  # the validation carve is the same for every training seed: runs pair up


@dataclass(frozen=True)
class TaskData:
    name: str
    signal_shape: tuple[int, ...]  # one example: (length,) for a 1-D signal, (rows, cols) image
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_task(name: str, *, val_fraction: float = 0.1, mnist1d_samples: int = 5000) -> TaskData:
    """The task's tensors (float32 inputs standardised on the training split, int64 labels)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if name == "mnist1d":
        x, y, x_test, y_test = _mnist1d(mnist1d_samples)
        shape = (x.shape[1],)
    else:
        x, y, x_test, y_test = _digits()
        shape = (8, 8)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    n_val = max(1, round(val_fraction * len(y)))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()

    def inputs(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(len(a), *shape)

    def labels(a):
        return torch.tensor(a, dtype=torch.int64)

    return TaskData(name, shape, 10, inputs(x[train]), labels(y[train]), inputs(x[val]),
                    labels(y[val]), inputs(x_test), labels(y_test))


@functools.lru_cache(maxsize=4)
def _mnist1d(num_samples: int):
    if num_samples < 100:
        raise ValueError(f"mnist1d_samples must be at least 100, got {num_samples}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset seeds Python's and NumPy's global generators; keep the caller's streams.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test
