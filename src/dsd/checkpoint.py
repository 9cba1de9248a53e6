"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a
torn one, even if the process dies mid-write."""

import json
import os
import tempfile
from pathlib import Path

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


def _atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
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
    """A file written by save_torch: tensors and plain Python data only (no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temps(directory) -> None:
    """Delete temp files left by a process killed mid-write (they were never renamed)."""
    for temp in Path(directory).glob(".*.tmp"):
        temp.unlink()
