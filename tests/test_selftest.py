"""The kernels' self-test (docs/kernels.md, Self-test): it passes on every backend that loads,
it fails, naming the op, on a kernel broken on purpose, and its exit statuses through
`python -m dsd_kernels.selftest` and `dsd info --check`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCES, _select

import dsd_kernels as dk
from dsd import cli
from dsd_kernels import backends, radix, selftest
from dsd_kernels._ops import OPS
from dsd_kernels.backends import Backend, BackendUnavailable, torch_ref


@pytest.fixture(autouse=True)
def restore_selection():
    yield
    dk.use_backend("auto")


def _failures(rows):
    return [row for row in rows if not row["ok"]]


def test_tolerances_are_the_tests():
    assert selftest.TOLERANCES == TOLERANCES


@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_passes_on_cpu(name):
    _select(name)  # skips where the backend does not load (outside CI)
    dk.use_backend("auto")
    rows = selftest.run(["cpu"], [name])
    assert rows and _failures(rows) == []
    ops = {row["op"] for row in rows}
    if name == "cpp":
        assert ops == set(OPS)
        assert {row["dtype"] for row in rows} == {"fp32", "fp16", "bf16", "mixed"}


def test_the_bracket_engages_and_is_forced_to_miss():
    _select("cpp")
    dk.use_backend("auto")
    before = torch.ops.dsd_cpp.bracket_misses()
    rows = selftest.run(["cpu"], ["cpp"])
    assert torch.ops.dsd_cpp.bracket_misses() > before
    assert torch.ops.dsd_cpp.set_bracket_scale(1.0) == 1.0  # restored after the missed case
    cases = {row["case"] for row in rows if row["op"] == "kth_smallest_abs"}
    assert any(case.startswith(f"bracketed ({selftest.BRACKETED_SIZE} keys)") for case in cases)
    assert selftest.BRACKETED_SIZE > radix.BRACKETED_NUMEL


@pytest.mark.slow  # Triton's interpreter without a GPU: about 30 s
def test_passes_on_triton():
    _select("triton")
    dk.use_backend("auto")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = selftest.run([device], ["triton"])
    assert rows and _failures(rows) == []
    assert {row["op"] for row in rows} == set(OPS)


def _broken(monkeypatch, op, breaks):
    """The reference kernels as a CPU backend named "cpp", with `op` broken by `breaks`."""
    kernels = dict(torch_ref.KERNELS)
    good = kernels[op]
    kernels[op] = lambda *args: breaks(good, *args)
    monkeypatch.setitem(backends._loaded, "cpp", Backend(kernels, ("CPU",)))


def _flip_one_mask_entry(good, *args):
    masks = good(*args)
    for mask in masks:
        if mask.numel() > 1:
            mask.view(-1)[1] = ~mask.view(-1)[1]
            break
    return masks


def _perturbed_sgd(good, params, *rest):
    good(params, *rest)
    params[0].view(-1)[0] += 0.01


def _one_ulp_more(good, *args):
    t = good(*args)
    return t + torch.finfo(t.dtype).eps * (1 + t.abs())


def _one_count_more(good, *args):
    hist = good(*args)
    hist[0, 0] += 1
    return hist


def _first_tensor_skipped(good, xs, masks, *values):
    good(xs[1:], masks[1:], *(v[1:] for v in values))


def _perturbed_adam_state(good, params, grads, exp_avgs, *rest):
    good(params, grads, exp_avgs, *rest)
    exp_avgs[0].view(-1)[0] += 0.01


BREAKS = {
    "magnitude_masks": _flip_one_mask_entry,
    "nm_masks": _flip_one_mask_entry,
    "nonzero_masks": _flip_one_mask_entry,
    "masked_sgd_": _perturbed_sgd,
    "kth_smallest_abs": _one_ulp_more,
    "kth_smallest_abs_per_tensor": _one_ulp_more,
    "magnitude_histogram": _one_count_more,
    "apply_masks_": _first_tensor_skipped,
    "fill_pruned_": _first_tensor_skipped,
    "masked_adam_": _perturbed_adam_state,
}


def test_every_op_can_be_broken():
    assert set(BREAKS) == set(OPS)


@pytest.mark.parametrize("op", [op if op in ("magnitude_masks", "masked_sgd_")
                                else pytest.param(op, marks=pytest.mark.slow) for op in BREAKS])
def test_a_broken_kernel_fails_with_its_op_named(monkeypatch, capsys, op):
    breaks = BREAKS[op]
    _broken(monkeypatch, op, breaks)
    rows = selftest.run(["cpu"], ["cpp"])
    assert _failures(rows) and {row["op"] for row in _failures(rows)} == {op}
    assert selftest.main(["--device", "cpu", "--backend", "cpp"]) == 1
    printed = capsys.readouterr().out
    assert f"\nFAIL cpp on cpu: {op} [fp32] " in printed
    if op == "magnitude_masks":
        assert "mask 0: 1 entries differ, first at flat index 1" in printed


def test_a_named_backend_that_does_not_load_fails(monkeypatch, capsys):
    monkeypatch.setitem(backends._loaded, "cpp", BackendUnavailable("no compiler here"))
    assert selftest.main(["--backend", "cpp"]) == 1
    assert "FAIL cpp on -: load [-] -: no compiler here" in capsys.readouterr().out


def test_cpp_is_not_loaded_for_cuda_alone(monkeypatch):
    monkeypatch.setattr(selftest, "_load", lambda name: pytest.fail(f"{name} loaded"))
    assert selftest.run(["cuda"], ["cpp"]) == []


def test_json_report(tmp_path, capsys):
    path = tmp_path / "out" / "selftest.json"
    assert selftest.main(["--device", "cpu", "--backend", "torch", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["ok"] is True and report["devices"] == ["cpu"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["rows"] and set(report["rows"][0]) == {
        "backend", "device", "op", "dtype", "case", "ok", "detail", "seconds"}
    assert "checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, error", [
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line(capsys, argv, error):
    assert selftest.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m dsd_kernels.selftest: error: ")
    assert error in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device_is_a_bad_argument(capsys):
    assert selftest.main(["--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_dsd_info_check(monkeypatch, capsys):
    # Triton's interpreter would add half a minute: test_passes_on_triton checks it.
    monkeypatch.setitem(backends._loaded, "triton", BackendUnavailable("not in this test"))
    assert cli.main(["info", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "dsd_kernels backends available: " in printed
    assert "\nbackend  device  op" in printed and "checks passed" in printed
    _broken(monkeypatch, "masked_sgd_", _perturbed_sgd)
    assert cli.main(["info", "--check"]) == 1
    assert "FAIL cpp on cpu: masked_sgd_" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess
def test_module_entry_point(tmp_path):
    path = tmp_path / "selftest.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", "dsd_kernels.selftest", "--backend", "torch",
                           "--device", "cpu", "--json", str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(path.read_text())["ok"] is True
