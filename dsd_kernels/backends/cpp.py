"""C++ CPU kernels from csrc/: built just-in-time on first use, or ahead of time by setup.py.

The extension defines every dsd op again in a private namespace, `dsd_cpp` (csrc/ops.cpp),
with the CPU kernels; `load()` hands those ops to backends/__init__.py, which registers them
for the CPU dispatch key of `dsd` while this backend is selected. The same library is also a
Python module whose host helpers (csrc/describe.cpp) `load()` installs in dsd_kernels.host.

The sources are csrc/ of a checkout, or dsd_kernels/csrc/ of an installed wheel. The
just-in-time build runs ninja through `torch.utils.cpp_extension.load` in a per-user cache:
$DSD_KERNELS_CACHE, else $XDG_CACHE_HOME/dsd_kernels, else ~/.cache/dsd_kernels, with one
folder per Python and torch version. A fingerprint of the sources and flags is kept beside the
library: while it matches, a later process loads the library without running ninja at all (so
which ninja is on PATH never matters). The first build is logged with its duration. A library
prebuilt by `DSD_BUILD_EXT=1 pip install --no-build-isolation .` is preferred while it is at
least as new as the sources next to it.
"""

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from .. import host
from .._ops import OPS
from . import Backend, BackendUnavailable

logger = logging.getLogger("dsd_kernels")

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# An installed wheel carries the sources in the package; a checkout has them beside it.
CSRC = next((d for d in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc") if d.is_dir()),
            PACKAGE_DIR / "csrc")
SOURCES = ("ops.cpp", "select.cpp", "threshold.cpp", "histogram.cpp", "mask.cpp", "nm.cpp",
           "zeros.cpp", "optim.cpp", "describe.cpp")
HEADERS = ("dsd_cpu.h",)

# at::parallel_for is OpenMP code in ATen's headers; torch ships the matching libgomp.
LINK_FLAGS = ("-fopenmp",)  # a tuple: cpp_extension may extend the list it is given


def vector_isa() -> str:
    """The instruction set to compile for: the widest of AVX-512 and AVX2 that torch itself
    runs on this CPU, else portable C++."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(),
                                                    "default")


def compile_flags(isa: str) -> list[str]:
    # No contraction of a*b+c into one fused multiply-add: the kernels round where torch's
    # tensor ops round, so they agree with the pure-torch backend to the last bit or close.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if isa == "avx512":  # ATen's own AVX-512 flags
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY_AVX512"]
    elif isa == "avx2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return flags


def extension_name(isa: str) -> str:
    return f"dsd_cpp_{isa}"


def build_directory(isa: str) -> Path:
    """Where the just-in-time build of `isa` lives: the cache folder of this Python and torch."""
    root = os.environ.get("DSD_KERNELS_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsd_kernels"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return Path(root) / tag / extension_name(isa)


def library_path(isa: str) -> Path:
    return build_directory(isa) / f"{extension_name(isa)}.so"


def fingerprint(isa: str) -> str:
    """What the library is built from: the sources' bytes and the flags (torch and Python
    are in the build directory's name)."""
    digest = hashlib.sha256(" ".join(compile_flags(isa) + list(LINK_FLAGS)).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return digest.hexdigest()


def load() -> Backend:
    """Load the kernels (building them if needed) or raise BackendUnavailable saying why;
    installs the library's host helpers in dsd_kernels.host."""
    isa = vector_isa()
    prebuilt = _prebuilt_library(isa)
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
        except OSError as error:
            raise BackendUnavailable(f"cannot load the prebuilt {prebuilt}: {error}") from error
        library, name = prebuilt, f"{PACKAGE_DIR.name}._cpp_{isa}"
    else:
        _build_and_load(isa)
        library, name = library_path(isa), extension_name(isa)
    # The library loaded above, imported again for its Python functions: the same file, so
    # the loader hands back the same handle and the op registrations run once.
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    host.use_library(module)
    return Backend({op: getattr(torch.ops.dsd_cpp, op) for op in OPS}, ("CPU",))


def _prebuilt_library(isa: str) -> Path | None:
    found = [path for suffix in importlib.machinery.EXTENSION_SUFFIXES
             if (path := PACKAGE_DIR / f"_cpp_{isa}{suffix}").is_file()]
    if not found:
        return None
    sources = [CSRC / name for name in SOURCES + HEADERS if (CSRC / name).is_file()]
    if sources and max(s.stat().st_mtime for s in sources) > found[0].stat().st_mtime:
        logger.info("dsd_kernels: %s is older than the sources in %s; building just-in-time",
                    found[0], CSRC)
        return None
    return found[0]


def _build_and_load(isa: str) -> None:
    missing = [name for name in SOURCES + HEADERS if not (CSRC / name).is_file()]
    if missing:
        raise BackendUnavailable(
            f"the C++ sources are not in {CSRC} (missing {', '.join(missing)}); install from a "
            "source checkout, or build ahead of time with DSD_BUILD_EXT=1")
    directory = build_directory(isa)
    library, stamp = library_path(isa), directory / "fingerprint.sha256"
    wanted = fingerprint(isa)
    if library.exists() and stamp.exists() and stamp.read_text() == wanted:
        torch.ops.load_library(str(library))  # built from these very sources: no ninja run
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BackendUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("ninja is not installed (pip install ninja)")
    directory.mkdir(parents=True, exist_ok=True)
    before = library.stat().st_mtime_ns if library.exists() else None
    if before is None:
        logger.warning("dsd_kernels: compiling the C++ CPU kernels, once (about a minute); "
                       "cached in %s", directory)
    start = time.perf_counter()
    try:
        cpp_extension.load(
            extension_name(isa), [str(CSRC / name) for name in SOURCES],
            extra_cflags=compile_flags(isa), extra_ldflags=list(LINK_FLAGS),
            build_directory=str(directory), is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as error:
        tail = "\n".join(str(error).strip().splitlines()[-20:])
        raise BackendUnavailable(f"building the C++ CPU kernels failed: {tail}") from error
    if library.stat().st_mtime_ns != before:
        logger.warning("dsd_kernels: built the C++ CPU kernels in %.1f s (%s)",
                       time.perf_counter() - start, library)
    stamp.write_text(wanted)
