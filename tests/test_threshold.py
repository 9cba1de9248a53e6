"""kth_smallest_abs on every backend and device against a torch.sort reference."""

import pytest
import torch
from conftest import DTYPES

import dsd_kernels as dk

import _oracle
from _backends import per_backend

pytestmark = per_backend  # every test here runs on each backend

SHAPES = [(1,), (7,), (3, 5), (33, 17), (4, 3, 5, 7), (1031,), (129, 257)]
KINDS = ["normal", "ties", "equal", "close"]


def _ks(n):
    return sorted({k for k in (1, 2, n // 3 + 1, n // 2, n - 1, n) if 1 <= k <= n})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_tensor(backend, device, dtype, shape, kind):
    x = _oracle.make(shape, dtype, device, kind, seed=len(shape))
    before = x.clone()
    for k in _ks(x.numel()):
        got = dk.kth_smallest_abs(x, k)
        assert got.shape == () and got.dtype == dtype and got.device.type == device
        assert got.float().item() == _oracle.kth_smallest_abs([x], k).item(), f"k={k}"
    assert torch.equal(x, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_list_of_tensors(backend, device, dtype, kind):
    xs = [_oracle.make(shape, dtype, device, kind, seed=i)
          for i, shape in enumerate([(5, 7), (1,), (300,), (16, 9, 3), (2,)])]
    for k in _ks(sum(x.numel() for x in xs)):
        got = dk.kth_smallest_abs(xs, k)
        assert got.dtype == dtype
        assert got.float().item() == _oracle.kth_smallest_abs(xs, k).item(), f"k={k}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_thresholds(backend, device, dtype, kind):
    """k a list: every tensor ranked on its own, in one call, as one call per tensor would."""
    xs = [_oracle.make(shape, dtype, device, kind, seed=i)
          for i, shape in enumerate([(5, 7), (1,), (300,), (16, 9, 3), (2,)])]
    for share in (0.0, 0.34, 0.5, 1.0):
        ks = [max(1, round(share * x.numel())) for x in xs]
        got = dk.kth_smallest_abs(xs, ks)
        assert got.shape == (len(xs),) and got.dtype == dtype and got.device.type == device
        want = [_oracle.kth_smallest_abs([x], k).item() for x, k in zip(xs, ks)]
        assert got.float().tolist() == want, ks


def test_mixed_dtypes_promote(backend, device):
    xs = [_oracle.make((40,), dtype, device, "normal", seed=i) for i, dtype in enumerate(DTYPES)]
    got = dk.kth_smallest_abs(xs, 50)
    assert got.dtype == torch.float32
    assert got.item() == _oracle.kth_smallest_abs(xs, 50).item()


def test_tuple_and_empty_tensor_in_list(backend, device):
    xs = (torch.empty(0, device=device), _oracle.make((9,), torch.float32, device, "normal"))
    assert dk.kth_smallest_abs(xs, 9).item() == _oracle.kth_smallest_abs(xs, 9).item()


def test_negative_zero_equals_zero(backend, device):
    x = torch.tensor([-0.0, 3.0, 0.0, -1.0], device=device)
    assert dk.kth_smallest_abs(x, 2).item() == 0.0
    assert dk.kth_smallest_abs(x, 3).item() == 1.0


def test_denormals(backend, device):
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([tiny / 8, -tiny / 4, tiny, 0.0, -tiny / 8], device=device)
    for k in range(1, 6):
        assert dk.kth_smallest_abs(x, k).item() == _oracle.kth_smallest_abs([x], k).item()


def test_opcheck(backend, device):
    xs = [_oracle.make((5, 3), torch.float32, device, "ties"),
          _oracle.make((4,), torch.float16, device, "normal")]
    torch.library.opcheck(torch.ops.dsd.kth_smallest_abs, (xs, 7))
    torch.library.opcheck(torch.ops.dsd.kth_smallest_abs_per_tensor, (xs, [3, 4]))
