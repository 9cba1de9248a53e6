"""The frameworks are optional: `import dsd` imports none of them, and an integration whose
framework is missing says in one line which extra to install."""

import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def _python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300)


def test_import_dsd_imports_no_framework():
    result = _python(f"""
        import sys
        import dsd, dsd.integrations, dsd_kernels, dsd_kernels.prune
        print([name for name in {FRAMEWORKS!r} if name in sys.modules])
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module, extra, hidden", [
    ("dsd.integrations.lightning", "lightning", ("lightning", "pytorch_lightning")),
    ("dsd.integrations.transformers", "transformers", ("transformers",)),
])
def test_a_missing_framework_names_the_extra(module, extra, hidden):
    result = _python(f"""
        import sys
        for name in {hidden!r}:
            sys.modules[name] = None  # as if not installed
        try:
            import {module}
        except ImportError as error:
            print(error)
    """)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert "\n" not in message and f"pip install 'dsd[{extra}]'" in message
