"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a
torn one, even if the process dies mid-write."""

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...); the message names the file
    and the reason, never the temp file, and whatever `path` held before is intact."""


class ReadError(ValueError):
    """A file is missing its content or is not what save_torch writes; the message says so."""


@contextmanager
def writing(path: Path):
    """Turn a failed write of `path` into a WriteError. torch.save reports a failed write as a
    RuntimeError ("enforce fail at inline_container.cc") raised while handling the OSError."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        raise WriteError(f"cannot write {path}: {reason}") from None


def _atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    with writing(path):
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
            with os.fdopen(fd, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
        _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(obj, path) -> None:
    _atomic_write(path, lambda file: torch.save(obj, file))


def save_bytes(data: bytes, path) -> None:
    _atomic_write(path, lambda file: file.write(data))


def save_text(text: str, path) -> None:
    save_bytes(text.encode(), path)


def save_json(obj, path) -> None:
    save_text(json.dumps(obj, indent=1) + "\n", path)


def load_torch(path):
    """A file written by save_torch: tensors and plain Python data only (no pickled code).
    Raises ReadError when the file is unreadable, empty, torn or not a torch file."""
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise ReadError(f"cannot read {path}: {error.strerror}") from None
    if size == 0:
        raise ReadError(f"{path} is empty")
    # Torn or foreign bytes raise EOFError, KeyError, OSError, RuntimeError or UnpicklingError,
    # depending on where they stop; a foreign pickle also warns about its protocol first.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ReadError(f"{path} is not a complete torch file (truncated or corrupted)") \
                from None


def remove_stale_temps(directory) -> None:
    """Delete temp files left by a process killed mid-write (they were never renamed)."""
    with writing(directory):
        for temp in Path(directory).glob(".*.tmp"):
            temp.unlink()
