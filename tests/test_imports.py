"""Lean imports (as torchao tests them): `import dsd`, `import dsd_kernels` and `dsd --help`
import no heavy optional module and start no C++ build, checked in a fresh interpreter."""

import json
import subprocess
import sys

HEAVY = ("matplotlib", "scipy", "lightning", "pytorch_lightning", "transformers")

# Each step runs in the same fresh interpreter; what a step leaves in sys.modules stays, so a
# module absent after the last step was imported by none of them. cpp_extension.load is what
# starts a just-in-time build (dsd_kernels/backends/cpp.py); loading the extension, built or
# prebuilt, adds its library to torch.ops.loaded_libraries, and importing it by name would add
# dsd_cpp_<isa> or dsd_kernels._cpp_<isa> to sys.modules.
_PROBE = """
import json, sys
import torch
from torch.utils import cpp_extension

builds = []
cpp_extension.load = lambda *args, **kwargs: builds.append(args[0])

def help():
    from dsd.cli import main
    try:
        main(["--help"])
    except SystemExit:
        pass

heavy, steps = {heavy!r}, {{}}
for step, run in (("import dsd_kernels", lambda: __import__("dsd_kernels")),
                  ("import dsd", lambda: __import__("dsd")), ("dsd --help", help)):
    run()
    steps[step] = {{
        "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
        "extension": sorted(m for m in sys.modules
                            if m.startswith("dsd_cpp_") or m.startswith("dsd_kernels._cpp_")),
        "builds": list(builds),
        "libraries": sorted(torch.ops.loaded_libraries),
    }}
print(json.dumps(steps))
"""


def test_imports_and_help_pull_no_heavy_module_and_build_nothing():
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout.splitlines()[-1])
    assert "usage: dsd" in done.stdout  # the help really ran
    assert list(steps) == ["import dsd_kernels", "import dsd", "dsd --help"]
    for step, found in steps.items():
        assert found == {"heavy": [], "extension": [], "builds": [], "libraries": []}, step
