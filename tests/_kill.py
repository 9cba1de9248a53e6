"""Hard-kill this process in the middle of its Nth torch.save: half the bytes reach the file,
then os._exit (no cleanup, no exception handlers). For the resume tests' subprocesses, which
find this module through PYTHONPATH (`subprocess_env`)."""

import io
import os
from pathlib import Path

import torch


def die_in_save(kill_at: int) -> None:
    real_save, calls = torch.save, [0]

    def dying_save(obj, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            os._exit(9)
        real_save(obj, file, *args, **kwargs)

    torch.save = dying_save


def subprocess_env(**extra) -> dict:
    """The environment of a subprocess that imports this module."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)
