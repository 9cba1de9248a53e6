"""Character-level language modelling on a UTF-8 file, or by default on the English text of
Python's `pydoc_data.topics` (the interactive help's topics, ~465K characters): it ships with
every CPython, so the task runs with no download and the same text everywhere.

The splits are contiguous (train, then validation, then the last tenth as test), so that
held-out text is really unseen.
"""

import functools
import sys
from pathlib import Path

import numpy as np

from .arrays import labels, stamp
from .splits import TEST_FRACTION
from .task_data import DataError, TaskData


def load(data, val_fraction: float, seq_len: int) -> TaskData:
    if data is None:
        vocab, ids, source = _embedded()
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"--data {path} does not exist; give a UTF-8 text file")
        if not path.is_file():
            raise DataError(f"--data {path} is not a file; give a UTF-8 text file")
        path = path.resolve()
        vocab, ids = _file(str(path), stamp([path]))
        source = str(path)
    n_chunks = (len(ids) - 1) // seq_len
    n_train, n_val, n_test = _split(n_chunks, val_fraction)
    if n_train < 1:
        need = _min_chunks(val_fraction) * seq_len + 1
        raise DataError(f"{source} has {len(ids)} characters; seq_len {seq_len} with "
                        f"val_fraction {val_fraction} needs at least {need} (a chunk each for "
                        f"train, validation and test): give a longer text or a smaller seq_len")
    x = ids[:n_chunks * seq_len].reshape(n_chunks, seq_len)
    y = ids[1:n_chunks * seq_len + 1].reshape(n_chunks, seq_len)
    cuts = (0, n_train, n_train + n_val, n_chunks)
    split = [(labels(x[a:b]), labels(y[a:b])) for a, b in zip(cuts, cuts[1:])]
    return TaskData("text", "text", (seq_len,), len(vocab), *split[0], *split[1], *split[2],
                    vocab=vocab, source=source)


def _split(n: int, val_fraction: float):
    """Chunk counts (train, validation, test): test the last tenth, validation just before."""
    n_test = max(1, round(TEST_FRACTION * n))
    n_val = max(1, round(val_fraction * (n - n_test)))
    return n - n_test - n_val, n_val, n_test


def _min_chunks(val_fraction: float) -> int:
    """The fewest chunks that leave one for training (the train count never falls as n grows)."""
    low, high = 2, 3
    while _split(high, val_fraction)[0] < 1:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _split(mid, val_fraction)[0] >= 1 else (mid, high)
    return high


def _encode(text: str):
    """(vocab: the sorted distinct characters, ids int64 with id = index into vocab)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    points, ids = np.unique(codes, return_inverse=True)
    return "".join(map(chr, points)), ids.astype(np.int64).reshape(-1)


@functools.lru_cache(maxsize=1)
def _embedded():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python lacks pydoc_data.topics (the embedded text corpus; some "
                        "distributions strip it); give --data FILE, a UTF-8 text file") from None
    version = ".".join(map(str, sys.version_info[:3]))
    return (*_encode("".join(topics[k] for k in sorted(topics))),
            f"embedded: pydoc_data.topics (Python {version})")


@functools.lru_cache(maxsize=2)
def _file(path: str, file_stamp: tuple):
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
