"""CIFAR-10 and CIFAR-100: the python archives (https://www.cs.toronto.edu/~kriz/cifar.html)
extracted into the folder given as `data`, read with the restricted unpickler (safe_pickle.py).
Training batches are augmented (random crop and flip, `dsd.data.augment`) as in the standard
CIFAR recipe."""

import functools
from pathlib import Path

import numpy as np
import torch

from . import safe_pickle
from .arrays import labels, stamp
from .splits import carve_validation
from .task_data import DataError, TaskData

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR = {  # task: (extracted folder, archive, training files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test",
                 b"fine_labels", 100),
}
TASKS = tuple(_CIFAR)


def load(name: str, data, val_fraction: float) -> TaskData:
    folder_name, archive, train_files, test_file, _, classes = _CIFAR[name]
    where = f"the folder {folder_name} extracted from {archive} ({URL}), or its parent"
    if data is None:
        raise DataError(f"task {name} needs --data DIR: {where}")
    root = Path(data).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"--data {root} {what}; give {where}")
    folder = (root / folder_name if (root / folder_name).is_dir() else root).resolve()
    files = [folder / f for f in (*train_files, test_file)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; it must hold "
                        f"{', '.join(f.name for f in files)}: {where}")
    x, y, x_test, y_test = _arrays(str(folder), stamp(files), name)
    if len(y) < 2 or len(y_test) == 0:
        raise DataError(f"{folder} holds {len(y)} training and {len(y_test)} test images; it "
                        f"needs at least 2 and 1 (train, validation, test): {where}")
    val, train = carve_validation(len(y), val_fraction, name)
    # Per channel on the 0..1 scale, exactly from the uint8 histogram of the training split.
    x_train = x[train]
    counts = np.stack([np.bincount(x_train[:, c].ravel(), minlength=256) for c in range(3)])
    levels = np.arange(256) / 255.0
    mean = counts @ levels / counts.sum(1)
    std = np.sqrt(np.maximum(counts @ levels**2 / counts.sum(1) - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    shift = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def inputs(a):
        return torch.from_numpy(a.astype(np.float32)).div_(255.0).sub_(shift).div_(scale)

    return TaskData(name, "image", (3, 32, 32), classes, inputs(x_train), labels(y[train]),
                    inputs(x[val]), labels(y[val]), inputs(x_test), labels(y_test),
                    augment=True, fill=tuple(float(-m / s) for m, s in zip(mean, std)),
                    source=str(folder))


@functools.lru_cache(maxsize=2)
def _arrays(folder: str, file_stamp: tuple, name: str):
    """Decoded (x uint8 (N, 3, 32, 32), y int64) for train and test, read-only (cached)."""
    _, _, train_files, test_file, label_key, classes = _CIFAR[name]
    train = [_batch(Path(folder, f), label_key, classes) for f in train_files]
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    x_test, y_test = _batch(Path(folder, test_file), label_key, classes)
    arrays = (x, y, x_test, y_test)
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _batch(path: Path, label_key: bytes, classes: int):
    hint = f"re-extract it from the archive ({URL})"
    try:
        batch = safe_pickle.load(path)
    except DataError:
        raise
    except Exception as error:  # a damaged pickle fails in many ways, all meaning the same
        raise DataError(f"{path} is not a readable pickle ({type(error).__name__}: {error}); "
                        f"{hint}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        found = ", ".join(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path} is not a CIFAR batch: it needs the keys b'data' and "
                        f"{label_key!r}, found {found}; {hint}")
    x, y = batch[b"data"], np.asarray(batch[label_key])
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2
            and x.shape[1] == 3 * 32 * 32):
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: b'data' must be uint8 rows of 3072 pixels (N, 3072), got "
                        f"{what}; {hint}")
    if y.ndim != 1 or len(y) != len(x) or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{path}: {label_key!r} must be {len(x)} integer labels, one per row of "
                        f"b'data', got {y.dtype} {y.shape}; {hint}")
    if len(y) and not 0 <= y.min() <= y.max() < classes:
        raise DataError(f"{path}: labels must be in 0..{classes - 1}, got {y.min()}..{y.max()}; "
                        f"{hint}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)
