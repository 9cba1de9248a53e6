"""The wheel a user installs: built from a clean clone, installed into a fresh virtual
environment with the checkout off the path, it carries the C++ sources, its C++ backend
serves CPU tensors, and `dsd train` runs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # clones, builds a wheel, makes a venv

ROOT = Path(__file__).resolve().parents[1]


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout to clone")
    tmp = tmp_path_factory.mktemp("wheel")
    _run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(tmp / "clone")])
    # No build isolation: an isolated build would download torch.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(tmp / "dist"), str(tmp / "clone")])
    wheel = next((tmp / "dist").glob("dsd-*.whl"))
    # The environment sees this interpreter's packages (torch and the other dependencies are
    # installed here), but dsd itself only from the wheel. Not --system-site-packages: from a
    # virtual environment that exposes the base interpreter's packages, not this one's.
    _run([sys.executable, "-m", "venv", str(tmp / "venv")])
    python = tmp / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)])
    # Written after the install, so pip never sees a dsd installed here. Plain directories in a
    # .pth come after the venv's own site-packages, so the wheel's dsd wins over such a dsd,
    # and their own .pth files (an editable install's) are not read.
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    (Path(site.stdout.strip()) / "running_interpreter.pth").write_text(
        "".join(f"{path}\n" for path in _package_dirs()))
    _run([str(python), "-c", DEPENDENCIES_SATISFIED])
    return tmp, python


def _package_dirs() -> list[str]:
    """The directories this interpreter imports installed packages from (its venv's or the
    global site-packages, the user's), without the standard library and the checkout."""
    stdlib = Path(os.__file__).resolve().parent  # may hold site-packages (not on Debian)
    dirs = []
    for entry in filter(None, sys.path):  # "": the working directory
        path = Path(entry).resolve()
        if path.is_dir() and path not in (stdlib, stdlib / "lib-dynload") \
                and not path.is_relative_to(ROOT) and str(path) not in dirs:
            dirs.append(str(path))
    return dirs


DEPENDENCIES_SATISFIED = textwrap.dedent("""
    from importlib.metadata import requires, version
    from packaging.requirements import Requirement
    for requirement in map(Requirement, requires("dsd")):
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            assert requirement.specifier.contains(version(requirement.name)), requirement
""")


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSD_BACKEND")}


def test_the_installed_wheel_serves_cpu_with_its_cpp_kernels(venv):
    tmp, python = venv
    script = textwrap.dedent("""
        import json, torch, dsd_kernels as dk
        from dsd_kernels.backends import cpp
        dk.use_backend("cpp")
        mask = dk.magnitude_masks(torch.randn(1000), 0.3)
        print(json.dumps({"package": dk.__file__, "sources": str(cpp.CSRC),
                          "selected": dk.selected_backends()["cpu"],
                          "pruned": int((~mask).sum())}))
    """)
    report = json.loads(_run([str(python), "-c", script], cwd=tmp, env=_env()).stdout)
    venv_dir = str(tmp / "venv")
    assert report["package"].startswith(venv_dir) and report["sources"].startswith(venv_dir)
    assert report["selected"] == "cpp" and report["pruned"] == 300


def test_dsd_train_runs_from_the_wheel(venv):
    tmp, _ = venv
    out = tmp / "run"
    _run([str(tmp / "venv" / "bin" / "dsd"), "train", "--task", "digits", "--phases", "1,1,1",
          "--mlp-hidden", "16", "--out", str(out), "--quiet"], cwd=tmp, env=_env())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"dsd"}
