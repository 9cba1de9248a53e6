"""Tiny data files in the real formats the data tasks read, for tests of any layer.

    folder = write_cifar(tmp_path, classes=100)     # tmp_path/cifar-100-python/{train,test,meta}
    load_task("cifar100", data=tmp_path)
"""

import pickle
from pathlib import Path

import numpy as np
import torch


def write_cifar(root, *, classes: int = 10, per_batch: int = 8, test: int = 8,
                seed: int = 0) -> Path:
    """The extracted CIFAR-10 (classes=10) or CIFAR-100 (classes=100) folder inside `root`,
    laid out like the real archive: pickled dicts with bytes keys, b"data" uint8 (N, 3072) in
    R, G, B planes of 32x32, labels a list. Each training file holds `per_batch` rows (CIFAR-10
    has five, CIFAR-100 one), the test file `test`. Returns the folder."""
    if classes not in (10, 100):
        raise ValueError(f"classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {classes}")
    rng = np.random.default_rng(seed)
    ten = classes == 10
    folder = Path(root) / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"labels" if ten else b"fine_labels"

    def batch(name, rows):
        content = {b"batch_label": name.encode(),
                   label_key: rng.integers(0, classes, rows).tolist(),
                   b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                   b"filenames": [f"img_{i}.png".encode() for i in range(rows)]}
        if not ten:
            content[b"coarse_labels"] = rng.integers(0, 20, rows).tolist()
        _dump(folder / name, content)

    for name in [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]:
        batch(name, per_batch)
    batch("test_batch" if ten else "test", test)
    if ten:
        _dump(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                                        b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    else:
        _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder


def _dump(path: Path, content: dict):
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)  # the real files are protocol 2 pickles


def write_text(path, chars: int = 2000, *, seed: int = 0) -> Path:
    """A UTF-8 text file of `chars` random characters from a 10-letter ASCII alphabet."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefgh ."))
    text = "".join(rng.choice(letters, chars))
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def write_tensors(path, *, n: int = 40, shape=(6,), classes: int = 3, test: bool = False,
                  seed: int = 0) -> Path:
    """A tensors-task file (.pt: a dict of tensors, .npz: arrays, by suffix) holding x float32
    (n, *shape) and y int64 labels in 0..classes-1, with x_test / y_test of n // 4 rows if
    `test`."""
    rng = np.random.default_rng(seed)

    def split(rows):
        return (rng.normal(size=(rows, *shape)).astype(np.float32),
                rng.integers(0, classes, rows).astype(np.int64))

    arrays = dict(zip(("x", "y"), split(n)))
    if test:
        arrays.update(zip(("x_test", "y_test"), split(n // 4)))
    path = Path(path)
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix == ".pt":
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    else:
        raise ValueError(f"write_tensors writes .pt or .npz, not {path.name}")
    return path
