"""Host helpers the C++ library reads faster: keys describing lists of tensors.

Each helper is a pure-Python function until the C++ backend loads, when `backends/cpp.py`
installs the library's version (csrc/describe.cpp: one pass, no Python per tensor) with
`use_library`. Nothing here loads or builds anything, and no backend imports another to reach
these: the Triton launch tables (docs/design.md, Triton launch tables) and the masked
optimizers' step plans (docs/design.md, Step plans) call `host.describe_tensors` and
`host.tensor_kinds`, looked up at each call.
"""

from collections.abc import Hashable
from itertools import compress, repeat
from operator import attrgetter, is_not

_DTYPE, _DEVICE, _LAYOUT = map(attrgetter, ("dtype", "device", "layout"))


def describe_in_python(lists) -> tuple:
    """A key equal for two calls exactly when the lists hold tensors (or None) at the same
    addresses, with the same devices, dtypes, sizes and strides."""
    return tuple(tuple(None if t is None else (t.device, t.dtype, t.data_ptr(), t.shape,
                                               t.stride()) for t in tensors)
                 for tensors in lists)


def tensor_kinds_in_python(lists) -> tuple:
    """A key equal for two calls exactly when the lists hold None at the same places and
    tensors of the same Python types, layouts, devices and dtypes elsewhere."""
    key = []
    for tensors in lists:
        present = tuple(map(is_not, tensors, repeat(None)))
        tensors = list(compress(tensors, present))
        key.append((present, *(tuple(map(kind, tensors))
                               for kind in (type, _LAYOUT, _DEVICE, _DTYPE))))
    return tuple(key)


class Description:
    """describe_tensors' key as the C++ library gives it: hashed as it was read, compared as
    bytes."""

    __slots__ = ("_hash", "_bytes")

    def __init__(self, described: tuple[int, bytes]):
        self._hash, self._bytes = described

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return type(other) is Description and self._bytes == other._bytes


# The helpers in use: Python's until the C++ library is loaded.
describe_tensors = describe_in_python
tensor_kinds = tensor_kinds_in_python


def use_library(module) -> None:
    """Install the C++ library's helpers (`module`: the loaded extension)."""
    global describe_tensors, tensor_kinds
    read = module.describe_tensors

    def describe_in_cpp(lists) -> Hashable:
        return Description(read(lists))

    describe_tensors, tensor_kinds = describe_in_cpp, module.tensor_kinds
