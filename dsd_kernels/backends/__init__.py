"""Backend selection: which kernels the dispatcher runs for each device.

The pure-torch reference is registered once for every device (CompositeExplicitAutograd) and
is the fallback. Selecting a backend registers its kernels for the dispatch keys it serves in
a fresh `torch.library.Library` and destroys the previous selection's Library, so the
dispatcher, not our code, decides which kernel runs.

A backend module (`cpp`, `triton`) exposes `load() -> Backend` and raises
`BackendUnavailable` with the reason when it cannot run here. Nothing is loaded at import:
the first call of a public op selects `DSD_BACKEND` (default "auto").

Under "auto", the Triton kernels are guarded: the first exception one raises on a device (it
fails to compile or to launch there) is logged once, and from then on that device is served
by the pure-torch kernels (docs/kernels.md, Safe "auto"). A named backend is never guarded.
"""

import importlib
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._ops import NAMESPACE, OPS
from . import torch_ref

logger = logging.getLogger("dsd_kernels")

BACKENDS = ("triton", "cpp", "torch")  # every backend, fastest first
BACKEND_CHOICES = ("auto",) + BACKENDS  # what use_backend and DSD_BACKEND take


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine; the message says why."""


class Backend(NamedTuple):
    kernels: dict[str, Callable]
    dispatch_keys: tuple[str, ...]  # e.g. ("CUDA",), or ("CPU",)


_reference_lib = torch.library.Library(NAMESPACE, "IMPL")
for _op in OPS:
    _reference_lib.impl(_op, torch_ref.KERNELS[_op], "CompositeExplicitAutograd")

_loaded: dict[str, Backend | BackendUnavailable] = {}
_selected_lib: torch.library.Library | None = None
_plan: dict[str, str] | None = None  # dispatch key -> backend name, for keys not on torch
_reported: set[str] = set()  # backends whose absence "auto" has already logged
# What "auto" picks per dispatch key where it loads (CUDA only where a GPU is visible).
AUTO_CHOICES = {"CPU": "cpp", "CUDA": "triton"}
GUARDED = ("triton",)  # backends whose kernels "auto" guards
_failed: dict[str, str] = {}  # dispatch key -> why its guarded kernels failed; torch serves it
_proven: set[tuple[str, str]] = set()  # (op, key): an in-place guarded kernel has succeeded


def _load(name: str) -> Backend | BackendUnavailable:
    """Load a backend once; the outcome (kernels or the reason they are missing) is cached."""
    if name not in _loaded:
        if name == "torch":
            _loaded[name] = Backend(dict(torch_ref.KERNELS), ("CompositeExplicitAutograd",))
        else:
            try:
                _loaded[name] = importlib.import_module(f"{__name__}.{name}").load()
            except BackendUnavailable as reason:
                _loaded[name] = reason
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run here (loads them: may build the C++ extension)."""
    return [name for name in BACKENDS if isinstance(_load(name), Backend)]


def _auto_plan() -> dict[str, str]:
    plan = {}
    for key, name in AUTO_CHOICES.items():
        if (key == "CUDA" and not torch.cuda.is_available()) or key in _failed:
            continue
        backend = _load(name)
        if isinstance(backend, Backend):
            plan[key] = name
        elif name not in _reported:
            _reported.add(name)
            logger.warning("dsd_kernels: %s backend unavailable (%s); %s tensors use the "
                           "pure-torch backend", name, backend, key)
    return plan


def use_backend(name: str = "auto") -> None:
    """Select the kernels for every op.

    Naming a backend puts it on every device it serves (Triton serves CPU tensors only under
    TRITON_INTERPRET=1); devices it does not serve keep the "auto" choice.

    Args:
        name: "auto" (Triton on CUDA and C++ on CPU where they load, else pure torch),
            "triton", "cpp" or "torch".

    Raises:
        ValueError: `name` is not one of those.
        BackendUnavailable: the named backend cannot run here; the message says why.
    """
    global _selected_lib, _plan
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    plan: dict[str, str] = {}
    if name != "torch":
        chosen = _load(name) if name != "auto" else None
        if isinstance(chosen, BackendUnavailable):
            raise BackendUnavailable(f"backend {name!r} is not available: {chosen}")
        plan = _auto_plan()
        guarded = {key for key, backend_name in plan.items() if backend_name in GUARDED}
        if chosen is not None:
            plan.update({key: name for key in chosen.dispatch_keys})
            guarded -= set(chosen.dispatch_keys)
    if _selected_lib is not None:
        _selected_lib._destroy()
        _selected_lib = None
    if plan:
        lib = torch.library.Library(NAMESPACE, "IMPL")
        for key, backend_name in plan.items():
            for op, kernel in _load(backend_name).kernels.items():
                lib.impl(op, _guarded(op, key, kernel) if key in guarded else kernel, key)
        _selected_lib = lib
    _plan = plan


_DEVICES = {"CPU": "cpu", "CUDA": "cuda"}


def _written_arguments(op: str) -> list[int]:
    """Positions of the op's arguments it writes in place (Tensor(a!)[] in its schema)."""
    schema = getattr(torch.ops.dsd, op).default._schema
    return [i for i, argument in enumerate(schema.arguments)
            if argument.alias_info is not None and argument.alias_info.is_write]


def _guarded(op: str, key: str, kernel: Callable) -> Callable:
    """`kernel` serving `key` under "auto": on its first failure, the pure-torch kernel
    answers and serves the device from then on.

    An op that writes only fresh outputs can always be answered again. One that writes its
    inputs in place (apply_masks_, the optimizer steps) may have launched and written part of
    them before a later launch failed, and cannot tell: answering again would apply the step
    twice. So its first call on the device runs on a snapshot of what it writes, restored
    before the reference answers; that is where a device on which Triton cannot compile or
    launch fails. A later failure (a new specialization that fails to compile) switches the
    device to torch too, and raises: that call's tensors may be partly updated.
    """
    reference = torch_ref.KERNELS[op]
    written = _written_arguments(op)

    def run(*args):
        if key in _failed:
            return reference(*args)
        first = written and (op, key) not in _proven
        # Kept in host memory: a step's tensors may be most of the device's memory.
        snapshot = ([[t.to("cpu", copy=True) for t in args[i]] for i in written] if first
                    else None)
        try:
            result = kernel(*args)
        except ValueError:
            raise  # the kernel refused its input (nm_masks: a NaN); the reference would too
        except Exception as error:
            _fail(op, key, error)
            if written and not first:
                raise RuntimeError(
                    f"dsd_kernels: the Triton {op} kernel failed on {_DEVICES[key]} after its "
                    f"first use ({_first_line(error)}); the tensors of this call may be partly "
                    f"updated. Later calls use the pure-torch kernels.") from error
            for i, saved in zip(written, snapshot or []):
                for t, s in zip(args[i], saved):
                    t.copy_(s)
            return reference(*args)
        if first:
            _proven.add((op, key))
        return result

    return run


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _fail(op: str, key: str, error: BaseException) -> None:
    """Serve `key` with the pure-torch kernels from now on, saying why once."""
    if key in _failed:
        return
    reason = _first_line(error)
    _failed[key] = reason
    if _plan is not None:
        _plan.pop(key, None)
    logger.warning("dsd_kernels: the Triton %s kernel failed on %s (%s); %s tensors use the "
                   "pure-torch backend from now on", op, _DEVICES[key], reason, _DEVICES[key])


def selected_backends() -> dict[str, str]:
    """The backend serving each device type, e.g. {"cpu": "cpp", "cuda": "triton"}."""
    ensure_selected()
    selected = {device: "torch" for device in _DEVICES.values()}
    selected.update({_DEVICES[key]: name for key, name in _plan.items()})
    return selected


def backend_from_env() -> str:
    """The backend `DSD_BACKEND` names ("auto" when it is unset); a ValueError if it names
    none."""
    name = os.environ.get("DSD_BACKEND", "auto")
    if name not in BACKEND_CHOICES:
        raise ValueError(f"DSD_BACKEND={name!r} is not a backend; choose one of "
                         f"{', '.join(BACKEND_CHOICES)}")
    return name


def ensure_selected() -> None:
    """Select `DSD_BACKEND` (default "auto") unless a backend was already selected."""
    if _plan is None:
        use_backend(backend_from_env())
