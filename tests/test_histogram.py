"""magnitude_histogram on every backend and device against a numpy count of the keys, and the
radix select driven over it (dsd_kernels.radix) against a sort."""

import numpy as np
import pytest
import torch
from conftest import DTYPES

import dsd_kernels  # noqa: F401  (defines the ops)
from dsd_kernels import radix

import _oracle
from _backends import per_backend

pytestmark = per_backend  # every test here runs on each backend

KINDS = ["normal", "ties", "equal", "close"]


def _keys(x) -> np.ndarray:
    """The magnitude keys, computed apart from the kernels: numpy's view of fp32 |x|."""
    return _oracle.flat_magnitudes([x]).numpy().view(np.uint32) & 0x7FFFFFFF


def _expected(xs, rows, prefixes, shift, bits):
    hist = np.zeros((len(prefixes), 1 << bits), dtype=np.int64)
    for x, row in zip(xs, rows):
        keys = _keys(x).astype(np.int64)
        chosen = keys[(keys >> (shift + bits)) == prefixes[row]]
        np.add.at(hist[row], (chosen >> shift) & ((1 << bits) - 1), 1)
    return hist


def _histogram(xs, rows, prefixes, shift, bits, device):
    got = torch.ops.dsd.magnitude_histogram(
        xs, rows, torch.tensor(prefixes, dtype=torch.int64, device=device), shift, bits)
    assert got.dtype == torch.int64 and got.device.type == device
    return got.cpu().numpy()


def _prefixes_of(xs, rows, count, shift, bits, seed):
    """Per row, the prefix of one of its entries (so the counts are not all zero)."""
    gen = np.random.default_rng(seed)
    prefixes = [0] * count
    for x, row in zip(xs, rows):
        keys = _keys(x).astype(np.int64)
        if len(keys):
            prefixes[row] = int(keys[gen.integers(len(keys))] >> (shift + bits))
    return prefixes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_digit_of_every_row(backend, device, dtype, kind):
    shapes = [(5, 7), (1,), (0,), (300,), (16, 9, 3), (2,)]
    xs = [_oracle.make(shape, dtype, device, kind, seed=i) for i, shape in enumerate(shapes)]
    xs[4] = xs[4].transpose(0, 2)  # strided
    rows = [1, 0, 2, 1, 0, 2]
    for seed, (shift, bits) in enumerate(radix.DIGITS + ((20, 3), (0, 1))):
        prefixes = _prefixes_of(xs, rows, 3, shift, bits, seed)
        assert np.array_equal(_histogram(xs, rows, prefixes, shift, bits, device),
                              _expected(xs, rows, prefixes, shift, bits)), (shift, bits)


def test_signed_zeros_denormals_and_a_single_element(backend, device):
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([-0.0, 0.0, tiny / 4, -tiny / 4, tiny / 2**20, 1.0], device=device)
    one = torch.tensor([-2.5], device=device)
    for shift, bits in radix.DIGITS:
        for prefix in (0, 1):
            got = _histogram([x, one], [0, 1], [prefix, prefix], shift, bits, device)
            assert np.array_equal(got, _expected([x, one], [0, 1], [prefix, prefix], shift,
                                                 bits))
    first = _histogram([x], [0], [0], 24, 7, device)
    assert first[0, 0] == 5 and first[0, 63] == 1  # zeros and denormals share the top digit 0


def test_many_tensors_and_only_empty_ones(backend, device):
    xs = [_oracle.make((n % 7 + 1, 3), torch.float32, device, "normal", seed=n)
          for n in range(60)]
    rows = [n % 25 for n in range(60)]
    prefixes = _prefixes_of(xs, rows, 25, 16, 8, 0)
    assert np.array_equal(_histogram(xs, rows, prefixes, 16, 8, device),
                          _expected(xs, rows, prefixes, 16, 8))
    empty = [torch.empty(0, device=device), torch.empty(0, 3, device=device)]
    assert not _histogram(empty, [0, 1], [0, 0], 24, 7, device).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_select_finds_each_rows_kth_key_and_its_ties(backend, device, dtype, kind):
    xs = [_oracle.make(shape, dtype, device, kind, seed=i)
          for i, shape in enumerate([(40,), (7, 3), (0,), (1,), (65,)])]
    rows = [0, 1, 1, 2, 0]
    for pick in (lambda n: 1, lambda n: (n + 1) // 2, lambda n: n):
        members = [[x for x, r in zip(xs, rows) if r == row] for row in range(3)]
        ks = [pick(sum(x.numel() for x in m)) for m in members]
        keys, ties = radix.select(xs, rows, torch.tensor(ks, device=device))
        for row, (m, k) in enumerate(zip(members, ks)):
            ordered = np.sort(np.concatenate([_keys(x) for x in m]))
            assert keys[row].item() == ordered[k - 1]
            assert ties[row].item() == np.sum(ordered[:k] == ordered[k - 1])
