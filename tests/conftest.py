"""Shared fixtures: every backend on every device, and the per-dtype tolerance table.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. TRITON_INTERPRET
must be set before any kernel module is imported, hence at the top of this file.

The interpreter runs a launch's programs one after another in program order, which would hide
a program that reads what another program of the same launch writes. DSD_TRITON_SHUFFLE=SEED
runs every interpreted launch's programs in a random order drawn from SEED instead; the
`shuffled_programs` fixture does it for one test. On a GPU the hardware picks the order.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dsd_kernels as dk  # noqa: E402
from dsd_kernels.backends import BACKENDS, BackendUnavailable  # noqa: E402


class _ShuffledPrograms:
    """Triton's interpreter walks a launch's grid in order, telling its builder the grid
    (set_grid_dim) and then each program's index (set_grid_idx); this maps the n-th index of
    the walk to the n-th of a random permutation of the grid."""

    def __init__(self, builder, seed: int):
        self._set_dim, self._set_idx = builder.set_grid_dim, builder.set_grid_idx
        self._random = random.Random(seed)

    def set_grid_dim(self, nx, ny, nz):
        self._dims = (nx, ny, nz)
        self._order = self._random.sample(range(nx * ny * nz), nx * ny * nz)
        self._set_dim(nx, ny, nz)

    def set_grid_idx(self, x, y, z):
        _, ny, nz = self._dims
        program = self._order[(x * ny + y) * nz + z]
        self._set_idx(program // (ny * nz), program // nz % ny, program % nz)


def shuffle_programs(setattr, seed: int) -> None:
    """Run every interpreted launch's programs in a random order drawn from `seed`; `setattr`
    patches the interpreter (builtins.setattr, or a monkeypatch's)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    shuffled = _ShuffledPrograms(builder, seed)
    setattr(builder, "set_grid_dim", shuffled.set_grid_dim)
    setattr(builder, "set_grid_idx", shuffled.set_grid_idx)


_SHUFFLE_SEED = os.environ.get("DSD_TRITON_SHUFFLE")
if _SHUFFLE_SEED and os.environ.get("TRITON_INTERPRET") == "1":
    if not _SHUFFLE_SEED.isdigit():
        raise ValueError(f"DSD_TRITON_SHUFFLE must be a seed (an integer), not {_SHUFFLE_SEED!r}")
    shuffle_programs(setattr, int(_SHUFFLE_SEED))


@pytest.fixture
def shuffled_programs(monkeypatch):
    """The test's interpreted launches run their programs in a random order (a no-op on a
    GPU, whose programs run in whatever order the hardware picks)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        shuffle_programs(monkeypatch.setattr, seed=0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Kernels compute in fp32 and round once on store, so two backends differ by at most a few
# fp32 roundings of the math plus one rounding of the stored dtype.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-3),
}

# Which dispatch device each backend serves (cpp: CPU only; triton: CUDA, or CPU when
# interpreted; torch: all).
_SERVES = {
    "torch": set(DEVICES),
    "cpp": {"cpu"},
    "triton": {"cuda"} if torch.cuda.is_available() else {"cpu"},
}


def _select(name):
    try:
        dk.use_backend(name)
    except BackendUnavailable as reason:
        # CI builds and installs every backend: there a missing one is a failure, not a skip.
        if os.environ.get("CI"):
            raise
        pytest.skip(str(reason))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """Select each backend in turn for the test's device; restore "auto" afterwards."""
    name = request.param
    if device not in _SERVES[name]:
        pytest.skip(f"the {name} backend does not serve {device} tensors")
    _select(name)
    yield name
    dk.use_backend("auto")


@pytest.fixture
def triton_backend():
    """The Triton backend selected (its interpreter on CPU); "auto" restored afterwards. If it
    cannot load: a skip, or under CI a failure."""
    try:
        dk.use_backend("triton")
    except BackendUnavailable as reason:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(reason))
    yield
    dk.use_backend("auto")


@pytest.fixture
def torch_backend():
    dk.use_backend("torch")
    yield
    dk.use_backend("auto")
