"""Safe "auto" (docs/kernels.md, Safe "auto"): a Triton kernel that fails on a device is
logged once and the pure-torch kernels serve that device from then on, never a wrong answer;
naming Triton still raises. Without a GPU, a fake Triton backend whose kernels fail is put in
the "auto" plan for CPU tensors."""

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import backends
from dsd_kernels.backends import Backend, torch_ref

MESSAGE = ("dsd_kernels: the Triton {op} kernel failed on cpu (RuntimeError: PTX assembly "
           "failed); cpu tensors use the pure-torch backend from now on")


class Failing:
    """Kernels that fail like a Triton kernel that cannot compile; with `after`, an in-place
    kernel that first works `after` times, then writes part of its tensors and fails."""

    def __init__(self, after=None):
        self.after, self.calls = after, 0

    def kernels(self):
        def fail(op):
            def kernel(*args):
                self.calls += 1
                if self.after is not None and self.calls <= self.after:
                    return torch_ref.KERNELS[op](*args)
                if op in ("apply_masks_", "fill_pruned_", "masked_sgd_", "masked_adam_"):
                    args[0][0].add_(1.0)  # a launch that ran before the one that failed
                raise RuntimeError("PTX assembly failed\nptxas fatal: details")
            return kernel
        return {op: fail(op) for op in torch_ref.KERNELS}


@pytest.fixture
def failing_triton(monkeypatch):
    """Install a failing Triton backend as auto's choice for CPU; yields its Failing."""
    def install(failing):
        monkeypatch.setitem(backends._loaded, "triton", Backend(failing.kernels(), ("CPU",)))
        dk.use_backend("auto")
        return failing

    with monkeypatch.context() as patch:
        patch.setattr(backends, "AUTO_CHOICES", {"CPU": "triton"})
        patch.setattr(backends, "_failed", {})
        patch.setattr(backends, "_proven", set())
        yield install
    dk.use_backend("auto")


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "dsd_kernels"]


def test_a_failing_kernel_falls_back_once_with_the_same_answer(failing_triton, caplog):
    failing_triton(Failing())
    assert dk.selected_backends()["cpu"] == "triton"
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="dsd_kernels"):
        masks = dk.magnitude_masks([w, w[:10]], 0.3)
        threshold = dk.kth_smallest_abs(w, 500)
        again = dk.magnitude_masks([w, w[:10]], 0.3)
    expected = torch_ref.magnitude_masks([w, w[:10]], [300, 3], "layer")
    assert all(torch.equal(a, b) for a, b in zip(masks, expected))
    assert all(torch.equal(a, b) for a, b in zip(again, expected))
    assert threshold == torch_ref.kth_smallest_abs([w], 500)
    assert _messages(caplog) == [MESSAGE.format(op="magnitude_masks")]
    assert dk.selected_backends()["cpu"] == "torch"
    dk.use_backend("auto")  # selecting again keeps the device on torch, without a new warning
    assert dk.selected_backends()["cpu"] == "torch"
    assert len(_messages(caplog)) == 1


def test_a_first_in_place_call_is_answered_from_its_snapshot(failing_triton, caplog):
    failing = failing_triton(Failing())
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(50, generator=gen), torch.randn(7, generator=gen)]
    grads = [torch.randn(50, generator=gen), torch.randn(7, generator=gen)]
    buffers = [torch.randn(50, generator=gen), torch.randn(7, generator=gen)]
    masks = [torch.rand(50, generator=gen) < 0.5, None]
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in buffers]
    torch_ref.masked_sgd_(want_p, grads, want_b, masks, 0.1, 0.9, 0.0, 0.0, False, False, None)
    with caplog.at_level("WARNING", logger="dsd_kernels"):
        dk.masked_sgd_(params, grads, buffers, masks, lr=0.1, momentum=0.9)
    assert failing.calls == 1
    for got, want in zip(params + buffers, want_p + want_b):
        assert torch.equal(got, want)  # the fake's partial write was undone, the step taken once
    assert _messages(caplog) == [MESSAGE.format(op="masked_sgd_")]


def test_a_first_fill_pruned_call_is_answered_from_its_snapshot(failing_triton, caplog):
    failing = failing_triton(Failing())
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, generator=gen), torch.randn(7, generator=gen).half()]
    masks = [torch.rand(x.shape, generator=gen) < 0.5 for x in xs]
    want = [x.clone().masked_fill_(~m, v) for x, m, v in zip(xs, masks, (0.25, -0.0))]
    with caplog.at_level("WARNING", logger="dsd_kernels"):
        dk.fill_pruned_(xs, masks, [0.25, -0.0])
    assert failing.calls == 1
    for got, w in zip(xs, want):  # the fake's partial write was undone
        assert torch.equal(got.view(torch.int16 if got.dtype == torch.half else torch.int32),
                           w.view(torch.int16 if w.dtype == torch.half else torch.int32))
    assert _messages(caplog) == [MESSAGE.format(op="fill_pruned_")]


def test_a_later_in_place_failure_raises_and_switches_the_device(failing_triton, caplog):
    failing_triton(Failing(after=1))
    x, mask = torch.randn(20), torch.rand(20) < 0.5
    dk.apply_masks_(x, mask)  # the first call works: no snapshot from now on
    with caplog.at_level("WARNING", logger="dsd_kernels"), \
            pytest.raises(RuntimeError, match="^dsd_kernels: the Triton apply_masks_ kernel "
                          "failed on cpu after its first use .*may be partly updated"):
        dk.apply_masks_(x, mask)
    assert _messages(caplog) == [MESSAGE.format(op="apply_masks_")]
    assert dk.selected_backends()["cpu"] == "torch"
    y = torch.randn(20)
    dk.apply_masks_(y, mask)
    assert torch.equal(y, torch.where(mask, y, 0.0))


def test_naming_triton_raises(failing_triton, monkeypatch):
    failing_triton(Failing())
    dk.use_backend("triton")
    with pytest.raises(RuntimeError, match="^PTX assembly failed"):
        dk.kth_smallest_abs(torch.randn(10), 3)
    monkeypatch.setattr(backends, "_plan", None)
    monkeypatch.setenv("DSD_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="^PTX assembly failed"):
        dk.magnitude_masks(torch.randn(10), 0.5)
    assert backends._failed == {}
