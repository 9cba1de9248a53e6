"""Independent references for the tests, built on torch.sort and torch.optim alone.

They share no code with the backends: a backend bug cannot hide in its own oracle.
"""

import math

import torch


def make(shape, dtype, device, kind, seed=0):
    """A test tensor: "normal" values, "ties" (few distinct values, both signs of zero),
    "equal" (one value everywhere) or "close" (one radix bucket: equal high bits)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=gen)
    elif kind == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).float() / 4
        x[torch.rand(shape, generator=gen) < 0.2] = -0.0
    elif kind == "equal":
        x = torch.full(shape, -0.75)
    elif kind == "close":
        # 1 + j * 2^-20: equal exponent and high mantissa bits, distinct low bits, with ties.
        x = 1 + torch.randint(0, 8, shape, generator=gen).float() * 2.0**-20
        x = x * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


def flat_magnitudes(xs):
    return torch.cat([x.detach().reshape(-1).float().abs().cpu() for x in xs])


def kth_smallest_abs(xs, k):
    return torch.sort(flat_magnitudes(xs)).values[k - 1]


def masks(xs, sparsity, scope):
    """Keep-masks that prune floor(sparsity*N) smallest |x|, ties pruned in position order
    (a stable sort keeps equal magnitudes in flat-index then tensor order)."""
    if scope == "layer":
        return [masks([x], sparsity, "global")[0] for x in xs]
    mags = flat_magnitudes(xs)
    k = math.floor(sparsity * mags.numel())
    keep = torch.ones(mags.numel(), dtype=torch.bool)
    keep[torch.argsort(mags, stable=True)[:k]] = False
    return [m.reshape(x.shape) for m, x in zip(keep.split([x.numel() for x in xs]), xs)]


def counts(xs, sparsity, scope):
    """The `ks` the dsd.magnitude_masks op takes: floor(sparsity*N) per tensor ("layer") or
    for all of them ("global")."""
    numels = [x.numel() for x in xs]
    return [math.floor(sparsity * n) for n in (numels if scope == "layer" else [sum(numels)])]


def nm_masks(x, n, m):
    """Keep-masks of the n largest |x| in each group of m consecutive entries along dim 1,
    computed in numpy: dim 1 moved last, groups as rows, a stable argsort of each row's
    magnitudes (equal ones stay in position order, so the lower index is pruned first)."""
    import numpy as np

    mags = np.abs(x.detach().cpu().float().numpy())
    moved = np.moveaxis(mags, 1, -1)
    groups = moved.reshape(-1, m)
    pruned = np.argsort(groups, axis=1, kind="stable")[:, :m - n]
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, pruned, False, axis=1)
    return torch.from_numpy(np.moveaxis(keep.reshape(moved.shape), -1, 1).copy())


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b) -> bool:
    """Equal bit for bit (so -0.0 differs from +0.0 and NaNs compare), tensors or lists of them
    (LBFGS's history), other values by ==."""
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_bits, a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def assert_same_state(opt_a, params_a, opt_b, params_b):
    """Weights and optimizer state bit for bit equal at every position, step counts included."""
    for pa, pb in zip(params_a, params_b):
        assert same_bits(pa.detach(), pb.detach())
        state_a, state_b = opt_a.state[pa], opt_b.state[pb]
        assert state_a.keys() == state_b.keys()
        for name in state_a:
            assert same_bits(state_a[name], state_b[name]), name
