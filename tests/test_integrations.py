"""The frameworks are optional: `import dsd` imports none of them, and an integration whose
framework is missing says in one line which extra to install."""

import importlib
import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


@pytest.mark.slow  # a fresh interpreter
def test_import_dsd_imports_no_framework():
    script = f"""
        import sys
        import dsd, dsd.integrations, dsd_kernels, dsd_kernels.prune
        print([name for name in {FRAMEWORKS!r} if name in sys.modules])
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module, extra, hidden", [
    ("dsd.integrations.lightning", "lightning", ("lightning.pytorch", "pytorch_lightning")),
    ("dsd.integrations.transformers", "transformers", ("transformers",)),
])
def test_a_missing_framework_names_the_extra(monkeypatch, module, extra, hidden):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)  # imported anew
    with pytest.raises(ImportError) as missing:
        importlib.import_module(module)
    message = str(missing.value)
    assert "\n" not in message and f"pip install 'dsd[{extra}]'" in message
