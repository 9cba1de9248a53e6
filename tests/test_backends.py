"""Backend selection: names, errors, DSD_BACKEND, and what the dispatcher really runs."""

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import backends


@pytest.fixture(autouse=True)
def restore_selection():
    yield
    dk.use_backend("auto")


def test_torch_is_always_available():
    assert "torch" in dk.available_backends()
    assert set(dk.available_backends()) <= set(backends.BACKENDS)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of auto, triton"):
        dk.use_backend("cuda")


def test_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cpp", backends.BackendUnavailable("no compiler here"))
    with pytest.raises(dk.BackendUnavailable, match="backend 'cpp' is not available: no compiler"):
        dk.use_backend("cpp")


def test_auto_falls_back_to_torch_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setitem(backends._loaded, "cpp", backends.BackendUnavailable("no compiler here"))
    monkeypatch.setattr(backends, "_reported", set())
    with caplog.at_level("WARNING", logger="dsd_kernels"):
        dk.use_backend("auto")
        dk.use_backend("auto")
    assert [r.getMessage() for r in caplog.records].count(
        "dsd_kernels: cpp backend unavailable (no compiler here); CPU tensors use the "
        "pure-torch backend") == 1
    assert dk.selected_backends()["cpu"] == "torch"
    x = torch.randn(100)
    assert dk.kth_smallest_abs(x, 10) == torch.sort(x.abs()).values[9]


def test_env_variable_selects_and_is_validated(monkeypatch):
    monkeypatch.setattr(backends, "_plan", None)
    monkeypatch.setenv("DSD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DSD_BACKEND='nonsense' is not a backend"):
        dk.kth_smallest_abs(torch.randn(5), 1)
    monkeypatch.setenv("DSD_BACKEND", "torch")
    dk.kth_smallest_abs(torch.randn(5), 1)
    assert dk.selected_backends() == {"cpu": "torch", "cuda": "torch"}


def test_selection_changes_the_dispatcher_registration():
    has_cpu_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    dk.use_backend("torch")
    assert not has_cpu_kernel("dsd::magnitude_masks", "CPU")  # only the reference, for all
    for name in dk.available_backends():
        dk.use_backend(name)
        serves_cpu = dk.selected_backends()["cpu"] != "torch"
        assert has_cpu_kernel("dsd::magnitude_masks", "CPU") == serves_cpu
