"""C++ CPU kernels from csrc/ (not written yet: issue 4)."""

from . import BackendUnavailable


def load():
    raise BackendUnavailable("the C++ CPU kernels are not part of this version yet")
