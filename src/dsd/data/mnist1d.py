"""MNIST-1D (Greydanus 2020): 10 classes of 40-sample 1-D signals, generated procedurally by the
`mnist1d` package (its `make_dataset`, not `get_dataset`, which may download a pickle). Small
MLPs overfit it, so it separates methods that small data hides."""

import functools
import random

import numpy as np

from .arrays import standardised_task
from .task_data import TaskData


def load(val_fraction: float, num_samples: int) -> TaskData:
    x, y, x_test, y_test = _generated(num_samples)
    return standardised_task("mnist1d", "signal", (x.shape[1],), x, y, x_test, y_test,
                             val_fraction=val_fraction, source="generated")


@functools.lru_cache(maxsize=4)
def _generated(num_samples: int):
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
