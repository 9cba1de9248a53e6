"""The tasks: tensors for train / validation / test, from local data, never downloaded.

- "mnist1d": MNIST-1D (Greydanus 2020), 10 classes of 40-sample 1-D signals, generated
  procedurally by the `mnist1d` package (its `make_dataset`, not `get_dataset`, which may
  download a pickle). Small MLPs overfit it, so it separates methods that small data hides.
- "digits": scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).
- "cifar10", "cifar100": the CIFAR python archives (https://www.cs.toronto.edu/~kriz/cifar.html)
  extracted into the folder given as `data`; training batches are augmented (random crop and
  flip, `dsd.augment.crop_flip`) as in the standard CIFAR recipe.
- "text": character-level language modelling on a UTF-8 file, or by default on the English
  text of Python's `pydoc_data.topics` (the interactive help's topics, ~465K characters): it
  ships with every CPython, so the task runs with no download and the same text everywhere.
- "tensors": the caller's own tensors, from a .pt or .npz file holding `x` and `y`.

The validation split is carved from the training set with a fixed seed (choose
hyper-parameters on it, never on the test set); text splits are contiguous instead, so that
held-out text is really unseen.
"""

import builtins
import codecs
import dataclasses
import functools
import pickle
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:  # numpy >= 2; numpy.core is its deprecated alias, which old pickles name
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

TASKS = ("mnist1d", "digits", "cifar10", "cifar100", "text", "tensors")
DATA_TASKS = ("cifar10", "cifar100", "text", "tensors")  # tasks that read --data
_SPLIT_SEED = 12345  # the validation carve is the same for every training seed: runs pair up
_ALTER_SEED = 271828  # with the run's seed: which examples are kept and which labels flip
_TEST_FRACTION = 0.1  # held out as test where the data has no test split of its own

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR = {  # task: (extracted folder, archive, training files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test",
                 b"fine_labels", 100),
}


class DataError(ValueError):
    """A data path that is missing or holds the wrong format: one line naming it and what to
    put there."""


@dataclass(frozen=True)
class TaskData:
    name: str
    kind: str  # "signal" (x (N, L)), "image" (x (N, H, W) or (N, C, H, W)), "text" (int64 (N, T))
    signal_shape: tuple[int, ...]  # one example's shape (x.shape[1:])
    num_classes: int  # text: the vocabulary size
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: bool = False  # training batches get random crop (padding 4) + horizontal flip
    fill: tuple[float, ...] | None = None  # per channel: a black pixel after normalisation
    vocab: str | None = None  # text: the characters, id = index
    source: str = ""  # the resolved path, or "embedded: ..." / "generated"


def load_task(name: str, *, data=None, val_fraction: float = 0.1, mnist1d_samples: int = 5000,
              seq_len: int = 128) -> TaskData:
    """The task's tensors: float32 inputs standardised on the training split (integer inputs
    of a tensors file and text ids kept as int64), int64 labels."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len!r}")
    if data is not None and name not in DATA_TASKS:
        raise DataError(f"task {name} is generated/shipped and reads no --data; --data is for "
                        f"{', '.join(DATA_TASKS)}")
    if name in _CIFAR:
        return _cifar_task(name, data, val_fraction)
    if name == "text":
        return _text_task(data, val_fraction, seq_len)
    if name == "tensors":
        return _tensors_task(data, val_fraction)
    if name == "mnist1d":
        x, y, x_test, y_test = _mnist1d(mnist1d_samples)
        shape, kind, source = (x.shape[1],), "signal", "generated"
    else:
        x, y, x_test, y_test = _digits()
        shape, kind, source = (8, 8), "image", "embedded: scikit-learn load_digits"
    val, train = _carve(len(y), val_fraction)
    mean, std = _moments(x[train])

    def inputs(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(len(a), *shape)

    return TaskData(name, kind, shape, 10, inputs(x[train]), _int64(y[train]), inputs(x[val]),
                    _int64(y[val]), inputs(x_test), _int64(y_test), source=source)


def alter_training(data: TaskData, *, examples: int = 0, label_noise: float = 0.0,
                   seed: int = 0) -> TaskData:
    """The task with fewer training examples and/or noisy labels, drawn per seed (the study's
    small-data and label-noise regimes). `examples` (0: all) keeps that many training examples
    of a seeded shuffle; `label_noise` replaces that share of the training and validation
    labels (both come from the training set) with a different class drawn uniformly; the test
    split stays as it is."""
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


def _carve(n: int, fraction: float):
    """(held-out indices, kept indices) of a fixed-seed shuffle of range(n)."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    held = max(1, round(fraction * n))
    return order[:held], order[held:]


def _moments(x: np.ndarray):
    """Scalar mean and std of the training inputs; constant inputs are only centred."""
    mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
    return mean, std or 1.0


def _int64(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.int64)


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


def _stamp(paths) -> tuple:
    """What the caches key on besides the path: a rewritten file is read again."""
    return tuple((p.name, s.st_mtime_ns, s.st_size) for p in paths for s in [p.stat()])


# --- CIFAR -----------------------------------------------------------------------------------

def _cifar_task(name: str, data, val_fraction: float) -> TaskData:
    folder_name, archive, train_files, test_file, _, classes = _CIFAR[name]
    where = (f"the folder {folder_name} extracted from {archive} ({_CIFAR_URL}), or its "
             f"parent")
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
    x, y, x_test, y_test = _cifar_arrays(str(folder), _stamp(files), name)
    val, train = _carve(len(y), val_fraction)
    if len(train) == 0 or len(y_test) == 0:
        raise DataError(f"{folder} holds {len(y)} training and {len(y_test)} test images; it "
                        f"needs at least 2 and 1 (train, validation, test): {where}")
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

    return TaskData(name, "image", (3, 32, 32), classes, inputs(x_train), _int64(y[train]),
                    inputs(x[val]), _int64(y[val]), inputs(x_test), _int64(y_test),
                    augment=True, fill=tuple(float(-m / s) for m, s in zip(mean, std)),
                    source=str(folder))


@functools.lru_cache(maxsize=2)
def _cifar_arrays(folder: str, stamp: tuple, name: str):
    """Decoded (x uint8 (N, 3, 32, 32), y int64) for train and test, read-only (cached)."""
    _, _, train_files, test_file, label_key, classes = _CIFAR[name]
    train = [_cifar_batch(Path(folder, f), label_key, classes) for f in train_files]
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    x_test, y_test = _cifar_batch(Path(folder, test_file), label_key, classes)
    arrays = (x, y, x_test, y_test)
    for a in arrays:
        a.setflags(write=False)
    return arrays


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR batch holds (dicts, lists, bytes and numpy arrays): a pickle
    can call any global it names, so every other one is refused before it is looked up."""

    _ALLOWED = {
        **{(f"numpy.{core}.{module}", name): found
           for core in ("core", "_core")
           for module, name, found in (("multiarray", "_reconstruct", _reconstruct),
                                       ("multiarray", "scalar", scalar),
                                       ("numeric", "_frombuffer", _frombuffer))},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes
        # Python 3 writes builtins as __builtin__ in protocols 0-2 (find_class, overridden
        # here, is what would map the name back).
        **{(module, name): getattr(builtins, name)
           for module in ("builtins", "__builtin__")
           for name in ("bytearray", "bytes", "dict", "frozenset", "list", "set", "tuple")},
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 strings (the real files) as bytes
        self.path = path

    def find_class(self, module, name):
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise DataError(f"{self.path} names the global {module}.{name}, which a CIFAR batch "
                            f"never holds; refusing to load it (a pickle can run code)")
        return found


def _cifar_batch(path: Path, label_key: bytes, classes: int):
    hint = f"re-extract it from the archive ({_CIFAR_URL})"
    try:
        with open(path, "rb") as file:
            batch = _CifarUnpickler(file, path).load()
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


# --- text ------------------------------------------------------------------------------------

def _text_task(data, val_fraction: float, seq_len: int) -> TaskData:
    if data is None:
        vocab, ids, source = _embedded_text()
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"--data {path} does not exist; give a UTF-8 text file")
        if not path.is_file():
            raise DataError(f"--data {path} is not a file; give a UTF-8 text file")
        path = path.resolve()
        vocab, ids = _text_file(str(path), _stamp([path]))
        source = str(path)
    n_chunks = (len(ids) - 1) // seq_len
    n_train, n_val, n_test = _text_split(n_chunks, val_fraction)
    if n_train < 1:
        need = _min_chunks(val_fraction) * seq_len + 1
        raise DataError(f"{source} has {len(ids)} characters; seq_len {seq_len} with "
                        f"val_fraction {val_fraction} needs at least {need} (a chunk each for "
                        f"train, validation and test): give a longer text or a smaller seq_len")
    x = ids[:n_chunks * seq_len].reshape(n_chunks, seq_len)
    y = ids[1:n_chunks * seq_len + 1].reshape(n_chunks, seq_len)
    cuts = (0, n_train, n_train + n_val, n_chunks)
    split = [(_int64(x[a:b]), _int64(y[a:b])) for a, b in zip(cuts, cuts[1:])]
    return TaskData("text", "text", (seq_len,), len(vocab), *split[0], *split[1], *split[2],
                    vocab=vocab, source=source)


def _text_split(n: int, val_fraction: float):
    """Chunk counts (train, validation, test): test the last tenth, validation just before."""
    n_test = max(1, round(_TEST_FRACTION * n))
    n_val = max(1, round(val_fraction * (n - n_test)))
    return n - n_test - n_val, n_val, n_test


def _min_chunks(val_fraction: float) -> int:
    """The fewest chunks that leave one for training (the train count never falls as n grows)."""
    low, high = 2, 3
    while _text_split(high, val_fraction)[0] < 1:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _text_split(mid, val_fraction)[0] >= 1 else (mid, high)
    return high


def _encode(text: str):
    """(vocab: the sorted distinct characters, ids int64 with id = index into vocab)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    points, ids = np.unique(codes, return_inverse=True)
    return "".join(map(chr, points)), ids.astype(np.int64).reshape(-1)


@functools.lru_cache(maxsize=1)
def _embedded_text():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python lacks pydoc_data.topics (the embedded text corpus; some "
                        "distributions strip it); give --data FILE, a UTF-8 text file") from None
    version = ".".join(map(str, sys.version_info[:3]))
    return (*_encode("".join(topics[k] for k in sorted(topics))),
            f"embedded: pydoc_data.topics (Python {version})")


@functools.lru_cache(maxsize=2)
def _text_file(path: str, stamp: tuple):
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}); give a readable UTF-8 "
                        f"text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: byte offset {error.start} "
                        f"({raw[error.start]:#04x}) {error.reason}; convert it to UTF-8") from None
    return _encode(text)


# --- tensors ---------------------------------------------------------------------------------

_TENSOR_SUFFIXES = (".pt", ".npz")


def _tensors_task(data, val_fraction: float) -> TaskData:
    holds = "a .pt or .npz file holding x and y (optionally x_test and y_test)"
    if data is None:
        raise DataError(f"task tensors needs --data FILE: {holds}")
    path = Path(data).expanduser()
    if path.suffix not in _TENSOR_SUFFIXES:
        raise DataError(f"--data {path}: task tensors reads {' and '.join(_TENSOR_SUFFIXES)} "
                        f"files, not {path.suffix or 'a file without a suffix'}; give {holds}")
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"--data {path} {what}; give {holds}")
    path = path.resolve()
    arrays = _read_tensors(path, holds)
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
        test, kept = _carve(len(y), _TEST_FRACTION)
        x_test, y_test = x[test], y[test]
    if len(kept) < 2:
        raise DataError(f"{path} has {len(y)} examples; it needs at least "
                        f"{2 if 'x_test' in arrays else 3}: one each for train, validation and "
                        f"test")
    val, train = (kept[i] for i in _carve(len(kept), val_fraction))
    if floating:
        mean, std = _moments(x[train])

        def inputs(a):
            return torch.tensor((a - mean) / std, dtype=torch.float32)
    else:
        def inputs(a):
            return torch.tensor(a, dtype=torch.int64)

    classes = int(max(y.max(), y_test.max())) + 1
    return TaskData("tensors", "signal" if x.ndim == 2 else "image", tuple(x.shape[1:]), classes,
                    inputs(x[train]), _int64(y[train]), inputs(x[val]), _int64(y[val]),
                    inputs(x_test), _int64(y_test), source=str(path))


def _read_tensors(path: Path, holds: str) -> dict:
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
