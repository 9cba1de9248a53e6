"""A restricted unpickler for the CIFAR batches: a pickle can call any global it names, so only
what a CIFAR batch holds (dicts, lists, bytes and numpy arrays) is let through, and every other
global is refused before it is looked up."""

import builtins
import codecs
import pickle
from pathlib import Path

import numpy as np

from .task_data import DataError

try:  # numpy >= 2; numpy.core is its deprecated alias, which old pickles name
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

_ALLOWED = {
    **{(f"numpy.{core}.{module}", name): found
       for core in ("core", "_core")
       for module, name, found in (("multiarray", "_reconstruct", _reconstruct),
                                   ("multiarray", "scalar", scalar),
                                   ("numeric", "_frombuffer", _frombuffer))},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes
    # Python 3 writes builtins as __builtin__ in protocols 0-2 (find_class, overridden here,
    # is what would map the name back).
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__")
       for name in ("bytearray", "bytes", "dict", "frozenset", "list", "set", "tuple")},
}


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 strings (the real files) as bytes
        self.path = path

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise DataError(f"{self.path} names the global {module}.{name}, which a CIFAR batch "
                            f"never holds; refusing to load it (a pickle can run code)")
        return found


def load(path: Path):
    """The object pickled in `path`; DataError if it names a global outside the allowed set
    (other errors of a damaged pickle propagate as the pickle module raises them)."""
    with open(path, "rb") as file:
        return _CifarUnpickler(file, path).load()
