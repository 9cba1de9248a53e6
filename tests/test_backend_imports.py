"""No module of one backend imports another backend (docs/design.md): host helpers that C++
speeds up live in dsd_kernels/host.py, which the C++ loader fills."""

import ast
from pathlib import Path

import pytest

PACKAGE = "dsd_kernels"
BACKENDS_DIR = Path(__file__).parents[1] / PACKAGE / "backends"
BACKEND_NAMES = ("cpp", "torch_ref", "triton")


def _module_name(path: Path) -> str:
    parts = path.relative_to(BACKENDS_DIR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _backend_of(module: str) -> str | None:
    """The backend a module belongs to: dsd_kernels.backends.<backend>[.anything]."""
    parts = module.split(".")
    if parts[:2] == [PACKAGE, "backends"] and len(parts) > 2 and parts[2] in BACKEND_NAMES:
        return parts[2]
    return None


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Every module an import statement of `source` (the code of `module`) may bind: the
    module named, and for `from X import y` also X.y (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]
    return found


def foreign_backends(path: Path) -> list[str]:
    module = _module_name(path)
    own = _backend_of(module)
    imported = imported_modules(path.read_text(), module, path.name == "__init__.py")
    return sorted({name for name in imported
                   if _backend_of(name) not in (None, own)})


BACKEND_MODULES = sorted(p for p in BACKENDS_DIR.rglob("*.py")
                         if _backend_of(_module_name(p)) is not None)


def test_every_backend_module_is_checked():
    names = {_module_name(p) for p in BACKEND_MODULES}
    assert {"dsd_kernels.backends.cpp", "dsd_kernels.backends.torch_ref",
            "dsd_kernels.backends.triton", "dsd_kernels.backends.triton.tables"} <= names


@pytest.mark.parametrize("path", BACKEND_MODULES, ids=lambda p: _module_name(p))
def test_no_backend_imports_another(path):
    assert foreign_backends(path) == []


@pytest.mark.parametrize("statement", [
    "from .. import cpp",
    "from .. import BackendUnavailable, cpp",
    "from ..cpp import load",
    "from ... import backends\nfrom ...backends import torch_ref",
    "from dsd_kernels.backends import cpp",
    "import dsd_kernels.backends.torch_ref",
    "def f():\n    from ..cpp import load",
])
def test_every_import_form_is_caught(statement):
    module = "dsd_kernels.backends.triton.tables"
    imported = imported_modules(statement, module, is_package=False)
    assert {_backend_of(name) for name in imported} - {None, "triton"}


def test_own_backend_and_neutral_modules_pass():
    module = "dsd_kernels.backends.triton.optim"
    source = ("from . import tables\nfrom .tables import lanes\nfrom ... import host\n"
              "from .. import Backend\nfrom ..._ops import OPS")
    imported = imported_modules(source, module, is_package=False)
    assert {_backend_of(name) for name in imported} <= {None, "triton"}
