"""The run directory: its default name, its config, and the lock that gives it to one run."""

import fcntl
import os
import re
from datetime import datetime
from pathlib import Path

from .. import atomic_io
from ..config import RunConfig
from .errors import RunDirError


def default_run_dir(config: RunConfig, label: str) -> Path:
    """runs/TASK-MODEL-sSEED-TIME, `label` being the model's name (see arms.model_label)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^\w.-]+", "_", label.rpartition(":")[2])  # a factory: its callable's name
    return Path("runs") / f"{config.task}-{name}-s{config.seed}-{stamp}"


def load_config(run_dir) -> RunConfig:
    """The config a run directory was started with.

    Raises:
        RunDirError: `run_dir` holds no config.toml.
    """
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise RunDirError(run_dir, "not a dsd run directory (no config.toml)")
    return RunConfig.from_toml(path)


def claim_run_dir(config: RunConfig, run_dir: Path) -> int:
    """Create the run directory and its config, or check the config of an existing one, and
    lock it for this process; returns the lock's file descriptor.

    The lock is a flock on the directory itself: it writes nothing, a second `dsd train` on the
    directory is refused while this process lives, and the kernel drops it when the process
    dies, however it dies. A directory that holds a run is not modified here.
    """
    for path in (run_dir, *run_dir.parents):  # the first part of the path that exists
        if path.exists():
            if not path.is_dir():
                raise RunDirError(run_dir, f"{path} is a file, not a directory")
            break
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
            created = True
        except FileExistsError:
            created = False
    except OSError as error:
        raise RunDirError(run_dir, f"cannot create it: {error.strerror}") from None
    try:
        lock = os.open(run_dir, os.O_RDONLY)
    except OSError as error:
        raise RunDirError(run_dir, f"cannot open it: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)  # the holder may have made the directory too: leave it alone
        raise RunDirError(run_dir, "another dsd train is running in it; wait for it to end, "
                          "or choose another --out") from None
    try:
        if created or not any(run_dir.iterdir()):
            # An empty directory is a new run (or one killed before its config was written).
            atomic_io.save_text(config.to_toml(), run_dir / "config.toml")
        else:
            saved = load_config(run_dir)
            if saved != config:
                diff = ", ".join(f"{key}: {saved.to_dict()[key]!r} there, {value!r} here"
                                 for key, value in config.to_dict().items()
                                 if saved.to_dict()[key] != value)
                raise RunDirError(run_dir, f"holds a run with another config ({diff}); choose "
                                  "another --out, or `dsd train --resume` it as it is")
    except BaseException:
        if created:
            run_dir.rmdir()
        os.close(lock)
        raise
    return lock
