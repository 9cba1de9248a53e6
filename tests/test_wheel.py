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
    # installed here), but dsd itself only from the wheel.
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")])
    python = tmp / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
          str(wheel)])
    _run([str(python), "-c", DEPENDENCIES_SATISFIED])
    return tmp, python


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
