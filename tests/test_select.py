"""The C++ selection engine (csrc/select.cpp): the sample's bracket, the one counting pass and
the fallback when the bracket misses, against the sort oracle, bit for bit, thresholds and
masks (ties included), every dtype; and that ordinary weights never fall back."""

import math

import pytest
import torch
from conftest import DTYPES, _select

import dsd_kernels as dk

import _oracle

# Above the engine's nth_element size (2^14 keys), across several chunks of 2^16.
SIZE = 3 * (1 << 16) + 1234


@pytest.fixture
def cpp():
    _select("cpp")
    yield torch.ops.dsd_cpp
    dk.use_backend("auto")


@pytest.fixture
def forced_misses(cpp):
    """Brackets of zero width: lo = hi = the sample's quantile, which misses unless the k-th
    smallest is tied there, so the radix fallback runs."""
    previous = cpp.set_bracket_scale(0.0)
    yield cpp
    cpp.set_bracket_scale(previous)


def _inputs(kind, dtype, seed=0):
    """Adversarial lists: each case is (tensors, ks to try)."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("normal", "ties", "equal", "close"):
        xs = [_oracle.make((SIZE,), dtype, "cpu", kind, seed)]
    elif kind == "two values":
        xs = [torch.where(torch.rand(SIZE, generator=gen) < 0.3, 1.5, -0.25).to(dtype)]
    elif kind == "denormals":
        tiny = torch.finfo(dtype).smallest_normal
        x = torch.randint(0, 64, (SIZE,), generator=gen).float() * (tiny / 64)
        x[::7] = -0.0
        xs = [x.to(dtype)]
    elif kind == "zeros and a tail":  # a pruned layer: most entries exactly 0
        x = torch.randn(SIZE, generator=gen)
        x[torch.rand(SIZE, generator=gen) < 0.6] = 0.0
        x[::3] *= -1
        xs = [x.to(dtype)]
    elif kind == "one crowded chunk":  # its copies do not fit its room: the group falls back
        x = torch.randn(SIZE, generator=gen)
        x[: 1 << 16] = 0.6745 + torch.rand(1 << 16, generator=gen) * 1e-3
        xs = [x.to(dtype)]
    elif kind == "list":  # tiny, empty, strided and large tensors ranked together
        xs = [torch.randn(5, generator=gen).to(dtype), torch.empty(0, dtype=dtype),
              torch.randn(300, 200, generator=gen).to(dtype).t(),
              torch.randn(SIZE, generator=gen).to(dtype)]
    else:
        raise ValueError(kind)
    total = sum(x.numel() for x in xs)
    return xs, sorted({1, 2, total // 3, total // 2, total // 2 + 1, total - 1, total})


KINDS = ["normal", "ties", "equal", "close", "two values", "denormals", "zeros and a tail",
         "one crowded chunk", "list"]


def _check_thresholds(xs, ks):
    for k in ks:
        got = torch.ops.dsd.kth_smallest_abs(xs, k)
        assert got.float().item() == _oracle.kth_smallest_abs(xs, k).item(), k
    nonempty = [x for x in xs if x.numel()]
    for share in (0.1, 0.5, 1.0):  # each tensor ranked on its own, all in one call
        per_tensor = [max(1, int(share * x.numel())) for x in nonempty]
        got = torch.ops.dsd.kth_smallest_abs_per_tensor(nonempty, per_tensor)
        assert got.float().tolist() == [_oracle.kth_smallest_abs([x], k).item()
                                        for x, k in zip(nonempty, per_tensor)], share


def _check_masks(xs):
    for scope in ("layer", "global"):
        for sparsity in (0.0, 0.3, 0.5, 0.9, 0.99):
            got = torch.ops.dsd.magnitude_masks(xs, _oracle.counts(xs, sparsity, scope), scope)
            for mask, want in zip(got, _oracle.masks(xs, sparsity, scope)):
                assert torch.equal(mask, want), (scope, sparsity)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_bracketed_selection_is_exact(cpp, kind, dtype):
    xs, ks = _inputs(kind, dtype)
    _check_thresholds(xs, ks)
    _check_masks(xs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_missed_brackets_fall_back_exactly(forced_misses, kind, dtype):
    xs, ks = _inputs(kind, dtype)
    before = forced_misses.bracket_misses()
    _check_thresholds(xs, ks)
    _check_masks(xs)
    if kind in ("normal", "list"):  # continuous values: a zero-width bracket must miss
        assert forced_misses.bracket_misses() > before


@pytest.mark.slow  # model-sized weights at four sparsities
def test_ordinary_weights_never_fall_back(cpp):
    gen = torch.Generator().manual_seed(1)
    shapes = [(256, 64, 3, 3), (1000, 512), (SIZE,), (4 * SIZE,), (20000,), (64,)]
    xs = [torch.randn(shape, generator=gen) * (i + 1) for i, shape in enumerate(shapes)]
    before = cpp.bracket_misses()
    for sparsity in (0.1, 0.5, 0.9, 0.999):
        k = math.floor(sparsity * sum(x.numel() for x in xs))
        _check_thresholds(xs, [k])
        for scope in ("layer", "global"):
            got = torch.ops.dsd.magnitude_masks(xs, _oracle.counts(xs, sparsity, scope), scope)
            for mask, want in zip(got, _oracle.masks(xs, sparsity, scope)):
                assert torch.equal(mask, want)
    assert cpp.bracket_misses() == before


def test_one_crowded_chunk_falls_back(cpp):
    xs, ks = _inputs("one crowded chunk", torch.float32)
    k = xs[0].numel() // 2  # the median |x|: inside the crowd
    before = cpp.bracket_misses()
    got = torch.ops.dsd.kth_smallest_abs(xs, k)
    assert cpp.bracket_misses() == before + 1
    assert got.item() == _oracle.kth_smallest_abs(xs, k).item()
