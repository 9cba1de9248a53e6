"""The tasks by name: `load_task` checks its arguments and hands over to the task's source."""

from . import cifar, digits, mnist1d, tensors, text
from .task_data import DataError, TaskData

TASKS = ("mnist1d", "digits", "cifar10", "cifar100", "text", "tensors")
DATA_TASKS = ("cifar10", "cifar100", "text", "tensors")  # tasks that read --data


def load_task(name: str, *, data=None, val_fraction: float = 0.1, mnist1d_samples: int = 5000,
              seq_len: int = 128) -> TaskData:
    """The task's tensors for train / validation / test, from local data, never downloaded.

    Inputs are float32, standardised on the training split (integer inputs of a tensors file
    and text ids stay int64); labels are int64. The validation split is carved from the
    training set with a fixed seed (contiguous for text).

    Args:
        name: one of `TASKS`.
        data: the folder (CIFAR) or file (text, tensors) to read; only for `DATA_TASKS`
            (text without it reads the embedded corpus).
        val_fraction: the share of the training set held out for validation, in (0, 1).
        mnist1d_samples: how many examples MNIST-1D generates (at least 100).
        seq_len: characters per example of the text task.

    Returns:
        The task's `TaskData`.

    Raises:
        ValueError: an unknown task, or val_fraction, seq_len or mnist1d_samples out of range.
        DataError: `data` missing, unreadable or of the wrong format, or a split left without
            an example (e.g. a val_fraction that leaves nothing to train on).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len!r}")
    if data is not None and name not in DATA_TASKS:
        raise DataError(f"task {name} is generated/shipped and reads no --data; --data is for "
                        f"{', '.join(DATA_TASKS)}")
    if name in cifar.TASKS:
        return cifar.load(name, data, val_fraction)
    if name == "text":
        return text.load(data, val_fraction, seq_len)
    if name == "tensors":
        return tensors.load(data, val_fraction)
    if name == "mnist1d":
        return mnist1d.load(val_fraction, mnist1d_samples)
    return digits.load(val_fraction)
