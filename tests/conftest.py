"""Shared fixtures: every backend on every device, and the per-dtype tolerance table.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. TRITON_INTERPRET
must be set before any kernel module is imported, hence at the top of this file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dsd_kernels as dk  # noqa: E402
from dsd_kernels.backends import BACKENDS, BackendUnavailable  # noqa: E402

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
def torch_backend():
    dk.use_backend("torch")
    yield
    dk.use_backend("auto")
