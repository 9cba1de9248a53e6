"""The caller's own tensors, from a .pt or .npz file holding `x` and `y` (optionally `x_test`
and `y_test`; without them a tenth is held out as test). Floating inputs are standardised on
the training split; integer inputs (ids) are kept as int64."""

from pathlib import Path

import numpy as np
import torch

from .arrays import labels, moments
from .splits import TEST_FRACTION, carve, carve_validation
from .task_data import DataError, TaskData

_SUFFIXES = (".pt", ".npz")


def load(data, val_fraction: float) -> TaskData:
    holds = "a .pt or .npz file holding x and y (optionally x_test and y_test)"
    if data is None:
        raise DataError(f"task tensors needs --data FILE: {holds}")
    path = Path(data).expanduser()
    if path.suffix not in _SUFFIXES:
        raise DataError(f"--data {path}: task tensors reads {' and '.join(_SUFFIXES)} "
                        f"files, not {path.suffix or 'a file without a suffix'}; give {holds}")
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"--data {path} {what}; give {holds}")
    path = path.resolve()
    arrays = _read(path, holds)
    x, y = arrays["x"], arrays["y"]
    floating = _check_inputs(path, "x", x)
    _check_labels(path, "y", y, x)
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        if _check_inputs(path, "x_test", x_test) != floating or x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test is {x_test.dtype} {x_test.shape[1:]} per example but "
                            f"x is {x.dtype} {x.shape[1:]}; give both the same shape and kind")
        _check_labels(path, "y_test", y_test, x_test)
        kept = np.arange(len(y))
    else:
        test, kept = carve(len(y), TEST_FRACTION)
        x_test, y_test = x[test], y[test]
    if len(kept) < 2:
        raise DataError(f"{path} has {len(y)} examples; it needs at least "
                        f"{2 if 'x_test' in arrays else 3}: one each for train, validation and "
                        f"test")
    val, train = (kept[i] for i in carve_validation(len(kept), val_fraction, "tensors"))
    if floating:
        mean, std = moments(x[train])

        def inputs(a):
            return torch.tensor((a - mean) / std, dtype=torch.float32)
    else:
        def inputs(a):
            return torch.tensor(a, dtype=torch.int64)

    classes = int(max(y.max(), y_test.max())) + 1
    return TaskData("tensors", "signal" if x.ndim == 2 else "image", tuple(x.shape[1:]), classes,
                    inputs(x[train]), labels(y[train]), inputs(x[val]), labels(y[val]),
                    inputs(x_test), labels(y_test), source=str(path))


def _read(path: Path, holds: str) -> dict:
    """The file's arrays by key: x, y and, when present, x_test, y_test, as numpy arrays."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as file:
                content = {k: file[k] for k in file.files}
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and numpy fail on a damaged file in many ways
        raise DataError(f"{path} cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else 'no detail'}); "
                        f"give {holds}") from None
    if isinstance(content, (tuple, list)) and len(content) == 2:
        content = {"x": content[0], "y": content[1]}
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}; give {holds} (a dict, or "
                        f"an (x, y) pair)")
    present = {"x", "y", "x_test", "y_test"} & set(content)
    if not {"x", "y"} <= present:
        found = ", ".join(map(str, content)) or "nothing"
        raise DataError(f"{path} holds {found}; give {holds}")
    if len(present) == 3:
        have, lack = sorted({"x_test", "y_test"} & present) + sorted({"x_test", "y_test"} - present)
        raise DataError(f"{path} holds {have} without {lack}; give both or neither")
    arrays = {}
    for key in sorted(present):
        value = content[key]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        if not isinstance(value, np.ndarray):
            raise DataError(f"{path}: {key} is a {type(value).__name__}, not a tensor or array")
        arrays[key] = value
    return arrays


def _check_inputs(path: Path, key: str, x: np.ndarray) -> bool:
    """Whether x is floating; refuses an empty x, one of another rank or kind, NaN and Inf."""
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: {key} has shape {x.shape}; give (N, L) signals or (N, H, W) / "
                        f"(N, C, H, W) images")
    if len(x) == 0 or x[0].size == 0:
        raise DataError(f"{path}: {key} is empty (shape {x.shape})")
    floating = np.issubdtype(x.dtype, np.floating)
    if not floating and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{path}: {key} is {x.dtype}; give floating inputs or integer ids")
    if floating and not np.isfinite(x).all():
        raise DataError(f"{path}: {key} holds NaN or Inf")
    return floating


def _check_labels(path: Path, key: str, y: np.ndarray, x: np.ndarray):
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} is {y.dtype} of shape {y.shape}; give 1-D integer class "
                        f"ids")
    if len(y) != len(x):
        raise DataError(f"{path}: {key} has {len(y)} labels but x{key[1:]} has {len(x)} examples")
    if y.min() < 0:
        raise DataError(f"{path}: {key} holds the negative label {y.min()}; class ids start at 0")
