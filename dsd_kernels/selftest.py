"""Known-answer checks of every dsd op on this machine's backends and devices.

    python -m dsd_kernels.selftest [--device cpu|cuda|all] [--backend NAME ...] [--json PATH]

For every backend that loads and every device it serves here (CPU; CUDA when visible; Triton
on CPU tensors only under TRITON_INTERPRET=1), each op runs on small adversarial inputs
(heavy ties, signed zeros, denormals, odd sizes, an empty tensor, each dtype, a list of mixed
dtypes, a list large enough for the bracket, and the same list with the bracket forced to miss;
Linear and Conv weights for N:M masks) and is compared with the answer computed on CPU: a sort
of the magnitudes for thresholds and masks (of each group's for N:M), `x != 0` for the masks
of a model's zeros, `torch.where` for applied masks, `masked_fill` for filled pruned entries,
the pure-torch reference for histograms and optimizer steps. Thresholds, masks, applied masks
and fills must match bit for bit; optimizer steps within the tests' tolerances, with pruned
entries exactly +0.0. Each backend's kernels are called directly, not through the selected
backend. Exit status: 0 all passed, 1 a check failed, 2 bad arguments.
"""

import argparse
import contextlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from . import radix
from ._ops import magnitude_dtype
from .backends import BACKENDS, Backend, _load, torch_ref

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The tests' per-dtype tolerances (tests/conftest.py): backends compute in fp32 and round once
# on store, so they differ by a few fp32 roundings plus one rounding of the stored dtype.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-3),
}

# Above radix.BRACKETED_NUMEL keys a group is bracketed (docs/design.md, The bracket).
BRACKETED_SIZE = radix.BRACKETED_NUMEL + 3617

SGD_VARIANTS = {
    "plain": dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, scaled=False),
    "momentum, dampening, weight decay": dict(lr=0.05, momentum=0.9, dampening=0.2,
                                              weight_decay=0.01, nesterov=False,
                                              maximize=False, scaled=False),
    "nesterov, maximize, grad scale": dict(lr=0.05, momentum=0.8, dampening=0.0,
                                           weight_decay=0.1, nesterov=True, maximize=True,
                                           scaled=True),
}
ADAM_VARIANTS = {
    "adam, weight decay": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                               decoupled=False, maximize=False, scaled=False),
    "adam, maximize, grad scale": dict(lr=1e-2, beta1=0.3, beta2=0.99, eps=1e-6,
                                       weight_decay=0.0, decoupled=False, maximize=True,
                                       scaled=True),
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
                  maximize=False, scaled=False),
}
GRAD_SCALE = 64.0
# fill_pruned_'s values, one per tensor in turn: a signed zero, an inexact value, one that
# rounds to fp16 through fp32 (as torch's fill) otherwise than directly, and a negative NaN.
FILL_VALUES = (-0.0, 1e-2, 1 + 2**-11 + 2**-40, -float("nan"))


class _Mismatch(Exception):
    """A check's result differs from the known answer; the message says where."""


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signs(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.where(torch.rand(x.shape, generator=_generator(seed)) < 0.5, -x, x)


def _ties(dtype):
    """1,023 values of four magnitudes (both zeros among them): every k lands in a tie."""
    values = torch.tensor([0.0, -0.0, 0.25, -0.5, 0.5, 1.0, -1.0])
    return [values[torch.randint(0, 7, (1023,), generator=_generator(1))].to(dtype)]


def _signed_zeros(dtype):
    return [torch.tensor([-0.0, 0.0, -0.0, 1.5, -0.0, 0.0, -2.0]).to(dtype)]


def _denormals(dtype):
    """Subnormal magnitudes of `dtype` (multiples of smallest_normal / 64), and zeros."""
    tiny = torch.finfo(dtype).smallest_normal
    x = torch.randint(0, 64, (2049,), generator=_generator(2)).float() * (tiny / 64)
    x[::9] = -0.0
    return [_signs(x, 3).to(dtype)]


def _odd_sizes(dtype):
    gen = _generator(4)
    xs = [torch.randn(n, generator=gen) for n in (1, 7, 1023, 2049)]
    xs[2][::5] = 0.5  # a tie across the list
    xs[3][::7] = -0.5
    return [x.to(dtype) for x in xs]


def _with_empty(dtype):
    return [torch.empty(0, dtype=dtype), torch.randn(5, generator=_generator(5)).to(dtype)]


def _mixed_dtypes(dtype):
    gen = _generator(6)
    return [torch.randn(1023, generator=gen), torch.randn(7, generator=gen).half(),
            torch.randn(2049, generator=gen).bfloat16()]


def _bracketed(dtype):
    x = torch.randn(BRACKETED_SIZE, generator=_generator(7))
    x[::11] = 0.75  # a tied value the bracket's bounds can land on
    return [x.to(dtype)]


MISSED = "bracket missed"
BRACKET_CASES = (f"bracketed ({BRACKETED_SIZE} keys)", MISSED)
# The threshold and mask cases: name -> the tensors of a dtype.
SELECT_CASES = {
    "ties": _ties,
    "signed zeros": _signed_zeros,
    "denormals": _denormals,
    "odd sizes 1, 7, 1023, 2049": _odd_sizes,
    "an empty tensor": _with_empty,
    "mixed dtypes": _mixed_dtypes,
    f"bracketed ({BRACKETED_SIZE} keys)": _bracketed,
    MISSED: _bracketed,
}
ONE_DTYPE = ("mixed dtypes",)  # cases whose tensors bring their own dtypes


def _nm_weights(dtype):
    """A Linear weight of tied magnitudes (both zeros, Inf), a Conv weight with subnormals,
    a channels_last Conv weight and an empty one: the N:M cases of a dtype."""
    values = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, float("inf"), -float("inf")])
    linear = values[torch.randint(0, 7, (6, 24), generator=_generator(8))]
    tiny = torch.finfo(dtype).smallest_normal
    conv = torch.randint(0, 8, (3, 16, 2, 3), generator=_generator(9)).float() * (tiny / 8)
    conv[:, ::5] = -0.0
    strided = torch.randn(4, 8, 3, 3, generator=_generator(10))
    strided = strided.to(memory_format=torch.channels_last)
    return [linear.to(dtype), _signs(conv, 11).to(dtype), strided.to(dtype),
            torch.empty(0, 8, dtype=dtype)]


NM_PATTERNS = ((2, 4), (1, 4), (4, 8), (3, 8))


def _ranks(total: int) -> list[int]:
    """The first, a middle and the last rank; past the bracket's size, the middle and the last
    (each rank of a large list costs seconds in Triton's interpreter)."""
    return sorted({1, total // 2 + 1, total} if total <= radix.BRACKETED_NUMEL
                  else {total // 2 + 1, total})


# ---------------------------------------------------------------- known answers (on CPU)

def _cpu(ts):
    return [None if t is None else t.detach().cpu() for t in ts]


def _magnitudes(xs):
    return torch.cat([x.reshape(-1).float().abs() for x in xs])


def _known_kth(xs, k):
    return torch.sort(_magnitudes(xs)).values[k - 1].to(magnitude_dtype(xs))


def _known_masks(xs, ks, scope):
    """Keep-masks pruning ks smallest |x| per segment, ties in position order (stable sort)."""
    if scope == "layer":
        return [_known_masks([x], [k], "global")[0] for x, k in zip(xs, ks)]
    keep = torch.ones(sum(x.numel() for x in xs), dtype=torch.bool)
    keep[torch.argsort(_magnitudes(xs), stable=True)[:ks[0]]] = False
    return [m.reshape(x.shape) for m, x in zip(keep.split([x.numel() for x in xs]), xs)]


# ---------------------------------------------------------------- comparisons

def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 and +0.0 differ."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t
    return t.float().view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _same_bits(got, want, what: str) -> None:
    got = got.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        raise _Mismatch(f"{what}: {got.dtype} {tuple(got.shape)}, expected {want.dtype} "
                        f"{tuple(want.shape)}")
    differ = (_bits(got) != _bits(want)).reshape(-1).nonzero()
    if differ.numel():
        i = int(differ[0])
        raise _Mismatch(f"{what}: {differ.numel()} entries differ, first at flat index {i}: "
                        f"{got.reshape(-1)[i].item()!r}, expected {want.reshape(-1)[i].item()!r}")


def _close(got, want, mask, what: str) -> None:
    got = got.detach().cpu()
    tol = TOLERANCES[want.dtype]
    g, w = got.float().reshape(-1), want.float().reshape(-1)
    bad = ~torch.isclose(g, w, equal_nan=True, **tol)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Mismatch(f"{what}: {int(bad.sum())} entries outside rtol={tol['rtol']} "
                        f"atol={tol['atol']}, first at flat index {i}: {g[i].item()!r}, "
                        f"expected {w[i].item()!r}")
    if mask is not None:
        pruned = _bits(got).reshape(-1)[~mask.cpu().reshape(-1)]
        if (pruned != 0).any():
            raise _Mismatch(f"{what}: a pruned entry is not +0.0")


# ---------------------------------------------------------------- checks per op

def _check_thresholds(kernels, xs, case):
    """kth_smallest_abs at several ranks, and the per-tensor form."""
    host = _cpu(xs)
    total = sum(x.numel() for x in xs)
    for k in _ranks(total):
        yield "kth_smallest_abs", f"{case}, k={k}", lambda k=k: _same_bits(
            kernels["kth_smallest_abs"](xs, k), _known_kth(host, k), "threshold")
    filled = [i for i, x in enumerate(xs) if x.numel()]

    def per_tensor():
        ks = [max(1, xs[i].numel() // 2) for i in filled]
        got = kernels["kth_smallest_abs_per_tensor"]([xs[i] for i in filled], ks)
        want = torch.stack([_known_kth([host[i]], k).to(torch.float32)
                            for i, k in zip(filled, ks)])
        _same_bits(got, want.to(magnitude_dtype([host[i] for i in filled])), "thresholds")

    yield "kth_smallest_abs_per_tensor", case, per_tensor


def _check_masks(kernels, xs, case):
    host = _cpu(xs)
    numels = [x.numel() for x in xs]
    layer = [n // 2 for n in numels]
    yield "magnitude_masks", f"layer 0.5: {case}", lambda: _same_masks(
        kernels["magnitude_masks"](xs, layer, "layer"), _known_masks(host, layer, "layer"))
    every = [int(0.9 * sum(numels))]
    yield "magnitude_masks", f"global 0.9: {case}", lambda: _same_masks(
        kernels["magnitude_masks"](xs, every, "global"), _known_masks(host, every, "global"))


def _known_nm_masks(xs, n, m):
    """Keep-masks of the n largest |x| in each group of m along dim 1: a stable sort of each
    group's magnitudes puts equal ones in position order, and its first m - n are pruned."""
    masks = []
    for x in xs:
        groups = x.float().abs().movedim(1, -1).reshape(-1, m)
        keep = torch.ones(groups.shape, dtype=torch.bool)
        keep.scatter_(1, torch.argsort(groups, dim=1, stable=True)[:, :m - n], False)
        masks.append(keep.reshape(x.movedim(1, -1).shape).movedim(-1, 1))
    return masks


def _check_nm(kernels, xs, case):
    host = _cpu(xs)
    for n, m in NM_PATTERNS:
        yield "nm_masks", f"{n}:{m}: {case}", lambda n=n, m=m: _same_masks(
            kernels["nm_masks"](xs, n, m), _known_nm_masks(host, n, m))


def _check_nonzero(kernels, xs, case):
    host = _cpu(xs)
    yield "nonzero_masks", case, lambda: _same_masks(kernels["nonzero_masks"](xs),
                                                     [x != 0 for x in host])


def _same_masks(got, want):
    got = list(got)
    if len(got) != len(want):
        raise _Mismatch(f"{len(got)} masks, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        _same_bits(g, w, f"mask {i}")


def _check_histogram(kernels, reference, xs, case):
    """The first digit of every row, and the second digit under one prefix."""
    host = _cpu(xs)
    rows = [i % 2 for i in range(len(xs))]
    device = xs[0].device
    shift, bits = radix.DIGITS[0]
    keys = _magnitudes(host).view(torch.int32)
    second_shift, second_bits = radix.DIGITS[1]
    prefix = int(keys.median()) >> (second_shift + second_bits) if keys.numel() else 0
    for (s, b), prefixes in (((shift, bits), [0, 0]), ((second_shift, second_bits),
                                                       [prefix, prefix])):
        def histogram(s=s, b=b, prefixes=prefixes):
            p = torch.tensor(prefixes, dtype=torch.int64)
            got = kernels["magnitude_histogram"](xs, rows, p.to(device), s, b)
            _same_bits_int(got, reference["magnitude_histogram"](host, rows, p, s, b))
        yield "magnitude_histogram", f"digit at bit {s}: {case}", histogram


def _same_bits_int(got, want):
    got = got.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        differ = (got != want).nonzero() if got.shape == want.shape else None
        where = f", first at {tuple(differ[0].tolist())}" if differ is not None and \
            differ.numel() else ""
        raise _Mismatch(f"histogram differs{where}")


def _masks_for(xs, seed):
    gen = _generator(seed)
    return [torch.rand(x.shape, generator=gen) < 0.6 for x in xs]


def _check_apply(kernels, xs, case):
    # Infinities and NaNs at pruned positions must become +0.0, kept ones stay as they are.
    host = [x.clone() for x in _cpu(xs)]
    masks = _masks_for(host, 11)
    for x, m in zip(host, masks):
        flat, pruned = x.view(-1), (~m).view(-1).nonzero().view(-1)
        flat[pruned[::3]] = float("nan")
        flat[pruned[1::3]] = float("-inf")
    device = xs[0].device

    def apply():
        targets = [x.to(device) for x in host]
        kernels["apply_masks_"](targets, [m.to(device) for m in masks])
        for i, (t, x, m) in enumerate(zip(targets, host, masks)):
            _same_bits(t, torch.where(m, x, torch.zeros((), dtype=x.dtype)), f"tensor {i}")
    yield "apply_masks_", case, apply

    values = [FILL_VALUES[i % len(FILL_VALUES)] for i in range(len(host))]

    def fill():
        targets = [x.to(device) for x in host]
        kernels["fill_pruned_"](targets, [m.to(device) for m in masks], values)
        for i, (t, x, m, v) in enumerate(zip(targets, host, masks, values)):
            _same_bits(t, x.masked_fill(~m, v), f"tensor {i} (value {v!r})")
    yield "fill_pruned_", case, fill


def _optimizer_inputs(xs, nonfinite):
    """Host tensors of one step: params, grads (signed zeros and subnormals among them; NaN
    and Inf at kept positions if `nonfinite`), states, masks (one parameter without)."""
    gen = _generator(12)
    params = _cpu(xs)
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        g.view(-1)[::5] = -0.0
        g.view(-1)[1::7] = torch.finfo(p.dtype).smallest_normal / 4
        grads.append(g.to(p.dtype))
    masks = _masks_for(params, 13)
    masks[-1] = None
    if nonfinite:
        flat, kept = grads[-1].view(-1), torch.arange(grads[-1].numel())
        flat[kept[::4]] = float("nan")
        flat[kept[1::4]] = float("inf")
    states = [[(torch.randn(p.shape, generator=gen) * scale).abs_().to(p.dtype)
               if positive else (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
               for p in params] for scale, positive in ((0.1, False), (0.01, True))]
    return params, grads, states, masks


def _check_optimizers(kernels, reference, xs, case, nonfinite):
    params, grads, states, masks = _optimizer_inputs(xs, nonfinite)
    device = xs[0].device
    steps = [float(s) for s in (1, 2, 10, 1000, 3)[:len(params)]]

    def run(op, state_count, call):
        """The backend's step on copies on the device, the reference's on CPU; both results,
        as host tensors."""
        results = []
        for fn, target in ((kernels[op], device), (reference[op], torch.device("cpu"))):
            ps = [p.clone().to(target) for p in params]
            gs = [g.clone().to(target) for g in grads]
            ss = [[s.clone().to(target) for s in state] for state in states[:state_count]]
            ms = [None if m is None else m.to(target) for m in masks]
            call(fn, ps, gs, ss, ms, target)
            results.append(_cpu(ps + [s for state in ss for s in state]))
        return results

    def compare(results):
        got, want = results
        for i, (g, w) in enumerate(zip(got, want)):
            which = ("param", "state 1", "state 2")[i // len(params)]
            _close(g, w, masks[i % len(params)], f"{which} {i % len(params)}")

    for name, hyper in SGD_VARIANTS.items():
        state_count = 1 if hyper["momentum"] else 0

        def sgd(hyper=hyper, state_count=state_count):
            def call(fn, ps, gs, ss, ms, target):
                scale = torch.tensor(GRAD_SCALE, device=target) if hyper["scaled"] else None
                if scale is not None:
                    gs = [g * GRAD_SCALE for g in gs]
                fn(ps, gs, ss[0] if ss else [], ms, hyper["lr"], hyper["momentum"],
                   hyper["dampening"], hyper["weight_decay"], hyper["nesterov"],
                   hyper["maximize"], scale)
            compare(run("masked_sgd_", state_count, call))
        yield "masked_sgd_", f"{name}: {case}", sgd

    for name, hyper in ADAM_VARIANTS.items():
        def adam(hyper=hyper):
            def call(fn, ps, gs, ss, ms, target):
                scale = torch.tensor(GRAD_SCALE, device=target) if hyper["scaled"] else None
                if scale is not None:
                    gs = [g * GRAD_SCALE for g in gs]
                fn(ps, gs, ss[0], ss[1], ms, steps, hyper["lr"], hyper["beta1"],
                   hyper["beta2"], hyper["eps"], hyper["weight_decay"], hyper["decoupled"],
                   hyper["maximize"], scale)
            compare(run("masked_adam_", 2, call))
        yield "masked_adam_", f"{name}: {case}", adam


# ---------------------------------------------------------------- the bracket forced to miss

@contextlib.contextmanager
def brackets_missed(backend: str):
    """While inside, the backend's brackets have zero width: lo = hi = the sample's quantile,
    which misses unless the k-th smallest is tied there, so the radix fallback runs. The
    pure-torch backend has no bracket."""
    if backend == "cpp":
        previous = torch.ops.dsd_cpp.set_bracket_scale(0.0)
        try:
            yield
        finally:
            torch.ops.dsd_cpp.set_bracket_scale(previous)
    elif backend == "triton":
        from .backends.triton import threshold
        previous = threshold.BRACKET_SCALE
        threshold.BRACKET_SCALE = 0.0
        try:
            yield
        finally:
            threshold.BRACKET_SCALE = previous
    else:
        yield


# ---------------------------------------------------------------- running

def _serves(backend: Backend, device: str) -> bool:
    keys = set(backend.dispatch_keys)
    return "CompositeExplicitAutograd" in keys or device.upper() in keys


def present_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _checks(name, kernels, device):
    """(op, dtype label, case, check, bracket missed) for one backend on one device."""
    reference = torch_ref.KERNELS
    for case, make in SELECT_CASES.items():
        labels = ["mixed"] if case in ONE_DTYPE else list(DTYPES)
        for label in labels:
            xs = [x.to(device) for x in make(DTYPES.get(label, torch.float32))]
            generators = [_check_thresholds(kernels, xs, case), _check_masks(kernels, xs, case)]
            if case not in BRACKET_CASES:  # neither op has a bracket
                generators.append(_check_apply(kernels, xs, case))
                generators.append(_check_nonzero(kernels, xs, case))
                if name != "torch" or device != "cpu":  # the reference is the known answer
                    generators.append(_check_histogram(kernels, reference, xs, case))
            for generator in generators:
                for op, what, check in generator:
                    yield op, label, what, check, case == MISSED
    for label, dtype in DTYPES.items():
        xs = [x.to(device) for x in _nm_weights(dtype)]
        case = "ties, zeros, Inf, subnormals, channels_last, empty"
        for op, what, check in _check_nm(kernels, xs, case):
            yield op, label, what, check, False
    if name == "torch" and device == "cpu":
        return  # the optimizer steps' known answer is this reference itself
    for case, nonfinite in (("odd sizes 1, 7, 1023, 2049", False),
                            ("NaN and Inf gradients", True)):
        for label, dtype in DTYPES.items():
            xs = [x.to(device) for x in _odd_sizes(dtype)]
            for op, what, check in _check_optimizers(kernels, reference, xs, case, nonfinite):
                yield op, label, what, check, False
    xs = [x.to(device) for x in _mixed_dtypes(None)]
    for op, what, check in _check_optimizers(kernels, reference, xs, "mixed dtypes", False):
        yield op, "mixed", what, check, False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run(devices=None, backends=None) -> list[dict]:
    """Run every check; one row per check: backend, device, op, dtype, case, ok, detail
    (empty when ok), seconds. `devices` and `backends` default to all present and loaded;
    a backend named here that cannot load gives one failed row (op "load")."""
    devices = present_devices() if devices is None else list(devices)
    named = backends is not None
    rows = []
    with warnings.catch_warnings():
        # NaN gradients make Triton's interpreter (numpy) warn; the results are checked.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        for name in (BACKENDS if backends is None else backends):
            rows += _run_backend(name, devices, named)
    return rows


# The C++ backend serves CPU tensors only: not loaded (which may build it) for other devices.
ONLY_ON = {"cpp": ("cpu",)}


def _run_backend(name, devices, named) -> list[dict]:
    if not set(devices) & set(ONLY_ON.get(name, devices)):
        return []
    loaded = _load(name)
    if not isinstance(loaded, Backend):
        return [dict(backend=name, device="-", op="load", dtype="-", case="-", ok=False,
                     detail=str(loaded), seconds=0.0)] if named else []
    rows = []
    for device in devices:
        if not _serves(loaded, device):
            continue
        for op, label, case, check, missed in _checks(name, loaded.kernels, device):
            start = time.perf_counter()
            try:
                with brackets_missed(name) if missed else contextlib.nullcontext():
                    check()
                ok, detail = True, ""
            except _Mismatch as mismatch:
                ok, detail = False, str(mismatch)
            except Exception as error:  # a kernel that raises fails its check
                ok, detail = False, f"raised {_first_line(error)}"
            rows.append(dict(backend=name, device=device, op=op, dtype=label, case=case, ok=ok,
                             detail=detail, seconds=round(time.perf_counter() - start, 4)))
    return rows


def skipped_backends(backends=None) -> dict[str, str]:
    """The backends that do not load here, with the reason."""
    return {name: str(_load(name)) for name in (backends or BACKENDS)
            if not isinstance(_load(name), Backend)}


def table(rows: list[dict]) -> str:
    """Pass/fail counts per backend, device and op, and the first mismatch of each failing op."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backend"], row["device"], row["op"]), []).append(row)
    header = ("backend", "device", "op", "passed", "failed", "seconds")
    lines = [[*key, str(sum(r["ok"] for r in group)), str(sum(not r["ok"] for r in group)),
              f"{sum(r['seconds'] for r in group):.2f}"] for key, group in groups.items()]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
           for line in [header, *lines]]
    for (backend, device, op), group in groups.items():
        failed = next((r for r in group if not r["ok"]), None)
        if failed is not None:
            out.append(f"FAIL {backend} on {device}: {op} [{failed['dtype']}] "
                       f"{failed['case']}: {failed['detail']}")
    passed = sum(r["ok"] for r in rows)
    out.append(f"{passed} of {len(rows)} checks passed" if rows else "no checks ran")
    return "\n".join(out) + "\n"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dsd_kernels.selftest",
                     description="Known-answer checks of every dsd_kernels op on every backend "
                                 "that loads and every device present.")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="the devices to check (default: all present)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, dest="backends",
                        metavar="NAME", help=f"a backend to check ({', '.join(BACKENDS)}); "
                                             "repeatable (default: every one that loads)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the rows, versions and devices as JSON")
    return parser


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        versions["cuda_device"] = torch.cuda.get_device_name(0)
    return versions


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except _UsageError as error:
        print(f"python -m dsd_kernels.selftest: error: {error}", file=sys.stderr)
        return 2
    devices = present_devices() if args.device == "all" else [args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m dsd_kernels.selftest: error: --device cuda, but no CUDA device is "
              "visible", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = run(devices, args.backends)
    seconds = time.perf_counter() - start
    for name, reason in skipped_backends(args.backends).items():
        if args.backends is None:
            print(f"{name}: not checked, it does not load here ({reason})")
    print(table(rows), end="")
    print(f"{seconds:.1f} s")
    ok = bool(rows) and all(r["ok"] for r in rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"ok": ok, "seconds": round(seconds, 3), "devices": devices,
             "versions": _versions(), "skipped": skipped_backends(args.backends),
             "rows": rows}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
