"""magnitude_masks, apply_masks_ and fill_pruned_ on every backend and device against a
stable-sort oracle and torch's masked_fill_."""

import math

import pytest
import torch
from conftest import DTYPES

import dsd_kernels as dk

import _oracle
from _backends import per_backend

pytestmark = per_backend  # every test here runs on each backend

SPARSITIES = [0.0, 0.1, 0.5, 0.9, 0.999]
LIST_SHAPES = [(33, 17), (1,), (7,), (4, 3, 5, 7), (2, 1031)]


@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "close"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_match_oracle(backend, device, dtype, scope, kind):
    xs = [_oracle.make(shape, dtype, device, kind, seed=i) for i, shape in enumerate(LIST_SHAPES)]
    before = [x.clone() for x in xs]
    for sparsity in SPARSITIES:
        got = dk.magnitude_masks(xs, sparsity, scope)
        want = _oracle.masks(xs, sparsity, scope)
        for i, (g, w, x) in enumerate(zip(got, want, xs)):
            assert g.dtype == torch.bool and g.shape == x.shape and g.device == x.device
            assert g.is_contiguous()
            assert torch.equal(g.cpu(), w), f"sparsity={sparsity} tensor {i}"
    assert all(torch.equal(x, b) for x, b in zip(xs, before))


@pytest.mark.parametrize("sparsity", [0.3, 0.29, 0.7, 0.5])
def test_exact_prune_count_per_layer(backend, device, sparsity):
    xs = [_oracle.make(shape, torch.float32, device, "ties", seed=i)
          for i, shape in enumerate([(10,), (100,), (7, 13), (3,)])]
    for x, mask in zip(xs, dk.magnitude_masks(xs, sparsity)):
        assert int((~mask).sum()) == math.floor(sparsity * x.numel())


def test_global_count_and_order(backend, device):
    xs = [torch.ones(4, device=device), torch.ones(3, device=device)]
    masks = dk.magnitude_masks(xs, 5 / 7 + 1e-9, "global")
    # All tied: the first five positions in (tensor, flat index) order are pruned.
    assert masks[0].tolist() == [False] * 4
    assert masks[1].tolist() == [False, True, True]


def test_explicit_counts_give_the_sparsity_masks_and_may_prune_all(backend, device):
    xs = [_oracle.make(shape, torch.float32, device, "ties", seed=i)
          for i, shape in enumerate(LIST_SHAPES)]
    for scope in ("layer", "global"):
        ks = _oracle.counts(xs, 0.5, scope)
        got = dk.magnitude_masks(xs, scope=scope, pruned=ks if scope == "layer" else ks[0])
        assert all(map(torch.equal, got, dk.magnitude_masks(xs, 0.5, scope)))
    numels = [x.numel() for x in xs]
    for scope, pruned in (("layer", numels), ("global", sum(numels))):
        assert not any(m.any() for m in dk.magnitude_masks(xs, scope=scope, pruned=pruned))
    one = dk.magnitude_masks(xs[0], pruned=7)
    assert torch.equal(one, dk.magnitude_masks(xs, pruned=[7] + [0] * 4)[0])


def test_tensor_in_mask_out(backend, device):
    x = torch.tensor([[0.5, -2.0], [0.1, 3.0]], device=device)
    mask = dk.magnitude_masks(x, 0.5)
    assert isinstance(mask, torch.Tensor)
    assert mask.tolist() == [[False, True], [False, True]]


def test_negative_zero_ties_by_position(backend, device):
    x = torch.tensor([0.0, 1.0, -0.0, 0.0, 2.0, -1.0], device=device)
    assert dk.magnitude_masks(x, 0.5).tolist() == [False, True, False, False, True, True]
    assert dk.magnitude_masks(x, 0.34).tolist() == [False, True, False, True, True, True]


def test_non_contiguous_input_uses_logical_order(backend, device):
    x = torch.ones(3, 4, device=device).t()  # logical order differs from memory order
    mask = dk.magnitude_masks(x, 0.25)
    assert torch.equal(mask.cpu(), _oracle.masks([x], 0.25, "layer")[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_masks_zeroes_exactly(backend, device, dtype):
    xs = [_oracle.make(shape, dtype, device, "normal", seed=i)
          for i, shape in enumerate([(33, 17), (5,), (1,)])]
    xs[0][0, :3] = torch.tensor([float("nan"), float("inf"), -5.0])
    masks = [torch.rand(x.shape, generator=torch.Generator().manual_seed(i)) < 0.5
             for i, x in enumerate(xs)]
    masks[0][0, :3] = False
    masks = [m.to(device) for m in masks]
    before = [x.clone() for x in xs]
    dk.apply_masks_(xs, masks)
    for x, b, m in zip(xs, before, masks):
        assert torch.equal(x[m], b[m])
        assert (x[~m] == 0).all() and not torch.signbit(x[~m]).any()


def test_apply_masks_non_contiguous(backend, device):
    x = _oracle.make((6, 5), torch.float32, device, "normal").t()
    mask = (torch.arange(30, device=device).reshape(5, 6) % 3) == 0
    want = torch.where(mask, x, 0.0)
    dk.apply_masks_(x, mask)
    assert torch.equal(x, want)


# 1 + 2**-11 + 2**-40 rounds to fp16's 1 + 2**-10 directly but to 1.0 through fp32, as
# torch's fill rounds; 1e-2 and 1/3 are inexact in every dtype; 65504 is fp16's largest; a
# vectorized cast would write other NaN bits than fill's.
FILL_VALUES = [0.0, -0.0, 1e-2, -1 / 3, 1 + 2**-11 + 2**-40, -65504.0, float("inf"),
               float("nan"), -float("nan")]


def _bits(t):
    return t.float().view(torch.int32) if t.dtype == torch.float32 else \
        t.view(torch.int16).int()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_pruned_writes_values_as_torch_fill_rounds_them(backend, device, dtype):
    shapes = [(33, 17), (5,), (1,), (2, 1031)] + [(3,)] * (len(FILL_VALUES) - 4)
    xs = [_oracle.make(shape, dtype, device, "normal", seed=i) for i, shape in enumerate(shapes)]
    xs[0][0, :3] = torch.tensor([float("nan"), float("inf"), -5.0])
    masks = [(torch.rand(x.shape, generator=torch.Generator().manual_seed(i)) < 0.5).to(device)
             for i, x in enumerate(xs)]
    masks[0][0, :2] = torch.tensor([True, False])  # a kept NaN stays, a pruned Inf goes
    want = [x.clone().masked_fill_(~m, v) for x, m, v in zip(xs, masks, FILL_VALUES)]
    dk.fill_pruned_(xs, masks, FILL_VALUES)
    for i, (x, w) in enumerate(zip(xs, want)):
        assert torch.equal(_bits(x), _bits(w)), f"value {FILL_VALUES[i]}"


def test_fill_pruned_one_value_for_all_and_zero_is_apply_masks(backend, device):
    xs = [_oracle.make(shape, torch.float32, device, "normal", seed=i)
          for i, shape in enumerate(LIST_SHAPES)]
    masks = [x > 0 for x in xs]
    filled, applied = [x.clone() for x in xs], [x.clone() for x in xs]
    dk.fill_pruned_(filled, masks, 0.0)
    dk.apply_masks_(applied, masks)
    assert all(torch.equal(_bits(f), _bits(a)) for f, a in zip(filled, applied))
    dk.fill_pruned_(filled, masks, 2.5)
    assert all(torch.equal(f, torch.where(m, x, 2.5)) for f, m, x in zip(filled, masks, xs))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_fill_pruned_non_contiguous(backend, device, layout):
    base = _oracle.make((4, 6, 5, 3), torch.float32, device, "normal")
    x = {"transposed": lambda: base.transpose(0, 3),
         "channels_last": lambda: base.to(memory_format=torch.channels_last),
         "sliced": lambda: base[:, ::2, 1:]}[layout]()
    outside = base.clone()
    mask = (torch.arange(x.numel(), device=device).reshape(x.shape) % 3) == 0
    want = torch.where(mask, x, -0.0)
    strides = x.stride()
    dk.fill_pruned_([x, base.new_ones(4)], [mask, torch.ones(4, dtype=torch.bool,
                                                             device=device)], [-0.0, 7.0])
    assert x.stride() == strides
    assert torch.equal(_bits(x), _bits(want))
    if layout == "sliced":  # entries outside the view are not written
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched[:, ::2, 1:] = False
        assert torch.equal(base[untouched], outside[untouched])


def test_opcheck(backend, device):
    xs = [_oracle.make((5, 3), torch.float32, device, "ties"),
          _oracle.make((4,), torch.bfloat16, device, "normal")]
    for scope in ("global", "layer"):
        args = (xs, _oracle.counts(xs, 0.4, scope), scope)
        torch.library.opcheck(torch.ops.dsd.magnitude_masks, args)
    masks = [x > 0 for x in xs]
    torch.library.opcheck(torch.ops.dsd.apply_masks_, ([x.clone() for x in xs], masks))
    torch.library.opcheck(torch.ops.dsd.fill_pruned_,
                          ([x.clone() for x in xs], masks, [0.5, -0.0]))
