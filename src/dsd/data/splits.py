"""Carving held-out splits out of a training set, with a fixed seed.

The validation carve is the same for every training seed, so that the runs of a study pair up;
choose hyper-parameters on it, never on the test split.
"""

import numpy as np

from .task_data import DataError

SPLIT_SEED = 12345
TEST_FRACTION = 0.1  # held out as test where the data has no test split of its own


def carve(n: int, fraction: float):
    """(held-out indices, kept indices) of a fixed-seed shuffle of range(n); at least one is
    held out."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    held = max(1, round(fraction * n))
    return order[:held], order[held:]


def carve_validation(n: int, val_fraction: float, task: str):
    """(validation indices, training indices) of `n` training examples; refuses a
    `val_fraction` that leaves no example to train on."""
    val, train = carve(n, val_fraction)
    if len(train) == 0:
        raise DataError(f"val_fraction {val_fraction} splits the {n:,} training examples of task "
                        f"{task} into {len(train)} for training and {len(val):,} for validation; "
                        f"each needs at least 1: give a smaller --val-fraction")
    return val, train
