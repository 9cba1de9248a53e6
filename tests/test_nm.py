"""nm_masks and nm_eligible on every backend and device against a numpy oracle over groups
(tests/_oracle.py), with adversarial inputs, layouts, refusals and many tensors per call."""

import pytest
import torch
from conftest import DTYPES

import dsd_kernels as dk

import _oracle
from _backends import per_backend

PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (1, 2)]
SHAPES = [(6, 16), (3, 8, 2, 3), (2, 16, 5), (5, 8)]  # Linear, Conv2d, Conv1d weights


def _adversarial(shape, dtype, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "specials":  # signed zeros, Inf, subnormals of the dtype and their ties
        tiny = torch.finfo(dtype).smallest_normal
        values = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 4, tiny / 2, 1.0, -1.0,
                               float("inf"), -float("inf")])
        return values[torch.randint(0, 9, shape, generator=gen)].to(dtype)
    return _oracle.make(shape, dtype, "cpu", kind, seed)


def _check(xs, pattern, device):
    n, m = dk._checks.pattern(pattern)
    xs = [x.to(device) for x in xs]
    before = [x.clone() for x in xs]
    got = dk.nm_masks(xs, pattern)
    for i, (g, x) in enumerate(zip(got, xs)):
        assert g.dtype == torch.bool and g.shape == x.shape and g.device == x.device
        assert g.is_contiguous()
        assert torch.equal(g.cpu(), _oracle.nm_masks(x, n, m)), f"{pattern} tensor {i}"
        kept = g.movedim(1, -1).reshape(-1, m).sum(1)
        assert (kept == n).all()
    assert all(torch.equal(x, b) for x, b in zip(xs, before))


@per_backend
@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "close", "specials"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_match_the_numpy_oracle(backend, device, dtype, kind):
    xs = [_adversarial(shape, dtype, kind, seed) for seed, shape in enumerate(SHAPES)]
    for pattern in PATTERNS:
        _check(xs, pattern, device)


@per_backend
def test_layouts_and_many_tensors_in_one_call(backend, device):
    gen = torch.Generator().manual_seed(3)
    conv = torch.randn(4, 8, 3, 3, generator=gen)
    xs = [conv.to(memory_format=torch.channels_last), torch.randn(16, 8, generator=gen).t(),
          torch.randn(4, 16, generator=gen)[:, ::2], torch.empty(0, 8),
          torch.randn(2, 4, 0, generator=gen)]
    xs += [torch.randn(3, 4 * (i % 5 + 1), generator=gen).to(DTYPES[i % 3]) for i in range(40)]
    _check(xs, "2:4", device)
    _check(xs, (3, 4), device)


@per_backend
def test_ties_prune_the_lower_index_first(backend, device):
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, -0.0, 0.0, -0.0],
                      [2.0, float("inf"), 2.0, -float("inf"), 5e-45, -5e-45, 0.0, 1e-45]],
                     device=device)
    assert dk.nm_masks(x, "2:4").int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1],
                                                     [0, 1, 0, 1, 1, 1, 0, 0]]
    assert dk.nm_masks(x, "1:8").int().tolist() == [[0, 0, 0, 1, 0, 0, 0, 0],
                                                     [0, 0, 0, 1, 0, 0, 0, 0]]


def test_groups_run_along_dim_1():
    dk.use_backend("torch")
    try:
        w = torch.arange(16.0).reshape(2, 8)  # rising along in_features: the last 2 of 4 kept
        assert dk.nm_masks(w, "2:4").int().tolist() == [[0, 0, 1, 1] * 2] * 2
        conv = torch.arange(8.0).reshape(1, 8, 1, 1).repeat(2, 1, 3, 3)  # rising along in
        assert (dk.nm_masks(conv, "2:4")[:, [2, 3, 6, 7]]).all()
        assert not (dk.nm_masks(conv, "2:4")[:, [0, 1, 4, 5]]).any()
    finally:
        dk.use_backend("auto")


def test_one_tensor_in_one_mask_out_and_a_list_in_a_list_out():
    x = torch.randn(4, 8)
    assert isinstance(dk.nm_masks(x, "2:4"), torch.Tensor)
    assert isinstance(dk.nm_masks((x, x), "2:4"), list)


@pytest.mark.parametrize("value", ["2:4", (2, 4), [1, 2], "4:8", "63:64"])
def test_patterns_parse(value):
    n, m = dk._checks.pattern(value)
    assert (n, m) == (tuple(value) if not isinstance(value, str)
                      else tuple(map(int, value.split(":"))))


@pytest.mark.parametrize("value", ["4:4", "0:4", "5:4", "2:65", "2:4:8", "a:4", " 2:4", "2/4",
                                   (2, 4.0), (True, 4), 4, None, "²:4"])
def test_bad_patterns_refused_in_one_line(value):
    with pytest.raises(ValueError, match=r"^pattern must be 'N:M' or an \(n, m\) pair") as info:
        dk.nm_masks(torch.randn(4, 8), value)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^pattern must be"):
        dk.nm_eligible(torch.randn(4, 8), value)


@pytest.mark.parametrize("shape, match", [
    ((8,), r"xs\[1\] \('fc.bias'\) has shape \(8\); N:M patterns need 2\+ dims"),
    ((4, 6), r"xs\[1\] \('fc.bias'\) has shape \(4, 6\); its dim 1 \(6\) is not a multiple "
             r"of M=4"),
    ((8, 2, 4, 4), r"its dim 1 \(2\) is not a multiple of M=4"),
])
def test_odd_shapes_refused_in_one_line(shape, match):
    xs = [torch.randn(4, 8), torch.randn(shape)]
    with pytest.raises(ValueError, match=match) as info:
        dk.nm_masks(xs, "2:4", names=["fc.weight", "fc.bias"])
    assert "\n" not in str(info.value)
    assert not dk.nm_eligible(xs[1], "2:4")
    assert dk.nm_eligible(xs[0], "2:4") and dk.nm_eligible(xs[0], (1, 8))


@per_backend
def test_nan_refused_inf_allowed(backend, device):
    x = torch.ones(4, 8, device=device)
    x[1, 3] = float("inf")
    assert dk.nm_masks(x, "1:4")[1, 3]
    x[2, 5] = float("nan")
    for dtype in DTYPES:
        xs = [torch.ones(2, 4, device=device), x.to(dtype)]
        with pytest.raises(ValueError, match=r"^xs\[1\] contains NaN; magnitudes are undefined$"):
            dk.nm_masks(xs, "2:4")
        with pytest.raises(ValueError, match=r"xs\[1\] contains NaN"):  # the kernel finds it
            torch.ops.dsd.nm_masks(xs, 2, 4)
    with pytest.raises(ValueError, match=r"^xs\[0\] \('fc.weight'\) contains NaN"):
        dk.nm_masks([x], "2:4", names=["fc.weight"])


@pytest.mark.parametrize("bad, match", [
    ([], "xs is an empty list"),
    ([torch.ones(2, 4, dtype=torch.float64)], r"xs\[0\] has dtype torch.float64"),
    ([torch.ones(2, 4), torch.ones(2, 4, device="meta")], r"xs\[1\] is on meta but xs\[0\]"),
    ("w", "xs must be a tensor or a list of tensors"),
])
def test_other_bad_input_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        dk.nm_masks(bad, "2:4")
    with pytest.raises(ValueError, match="x must be a tensor"):
        dk.nm_eligible("w", "2:4")


def test_meta_tensors_give_meta_masks():
    mask = dk.nm_masks(torch.empty(4, 8, device="meta"), "2:4")
    assert mask.device.type == "meta" and mask.shape == (4, 8) and mask.dtype == torch.bool


@per_backend
def test_opcheck(backend, device):
    xs = [torch.randn(4, 8, device=device), torch.randn(2, 4, 3, 3, device=device).half()]
    torch.library.opcheck(torch.ops.dsd.nm_masks, (xs, 2, 4))


def test_triton_interpreted_matches_the_oracle(triton_backend):
    """A fast interpreted case of every shape class and dtype (the per-backend tests run
    Triton's interpreter with the slow tests)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = [_adversarial(shape, dtype, "specials", seed)
          for seed, (shape, dtype) in enumerate(zip(SHAPES, DTYPES * 2))]
    xs.append(torch.randn(40, 1024))  # full chunks of a program, then a tail
    xs.append(torch.randn(3, 12, 2))  # a group size that is not a power of 2
    _check(xs, "2:4", device)
    _check(xs[:-1], "4:8", device)
    _check(xs[-1:], "5:6", device)


def test_a_guarded_kernel_refusing_nan_is_not_a_failed_kernel():
    """Under "auto" a Triton kernel's exception switches its device to torch; a NaN refused
    is the input's fault, so it propagates and the device keeps its kernels."""
    from dsd_kernels import backends

    def refuses(xs, n, m):
        raise ValueError("xs[0] contains NaN; magnitudes are undefined")

    run = backends._guarded("nm_masks", "CPU", refuses)
    with pytest.raises(ValueError, match="contains NaN"):
        run([torch.ones(2, 4)], 2, 4)
    assert "CPU" not in backends._failed
