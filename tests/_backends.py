"""Interpreted Triton cases of the backend-parametrized suites run with the slow tests.

Without a GPU, Triton's interpreter runs every kernel in Python: each case costs seconds, and
the suites of the ops repeat them for every dtype and shape. `per_backend` parametrizes
conftest.py's `backend` fixture with its "triton" case marked slow there;
tests/test_triton_backend.py keeps fast interpreted cases of every op.
"""

import os

import pytest

from dsd_kernels.backends import BACKENDS

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

per_backend = pytest.mark.parametrize(
    "backend", [pytest.param(name, marks=pytest.mark.slow) if name == "triton" and _INTERPRETED
                else name for name in BACKENDS], indirect=True)
