"""Triton kernels for CUDA (not written yet: issue 3)."""

from .. import BackendUnavailable


def load():
    raise BackendUnavailable("the Triton kernels are not part of this version yet")
