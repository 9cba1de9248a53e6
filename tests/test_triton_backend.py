"""The Triton backend beyond the shared op tests: radix-select corner cases (tied buckets,
every digit, denormals, signed zeros), lists that stress the multi-tensor tables, layouts,
the optimizer classes against torch.optim, no recompiles, compile/opcheck and loading.

Runs on CUDA when a GPU is present, else on CPU tensors in Triton's interpreter (conftest
sets TRITON_INTERPRET=1). The pure-torch backend is the oracle.
"""

import inspect
import os
import sys

import pytest
import torch
from conftest import DTYPES, TOLERANCES, shuffle_programs

import dsd_kernels as dk
from dsd_kernels.backends import BackendUnavailable, torch_ref

import _oracle

triton_backend = pytest.importorskip("dsd_kernels.backends.triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsd_kernels.backends.triton import threshold  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("triton_backend")


def _bracket_segments_above(monkeypatch, numel):
    from dsd_kernels import radix
    monkeypatch.setattr(radix, "BRACKETED_NUMEL", numel)
    threshold._TABLES.clear()  # their samples were chosen by the old bound


@pytest.fixture(params=["bracketed", "radix only"])
def bracket(request, monkeypatch):
    """The select with every segment of more than 64 keys bracketed, and with none (the
    radix passes alone: the bracket's fallback)."""
    _bracket_segments_above(monkeypatch, 64 if request.param == "bracketed" else 1 << 62)
    yield request.param
    threshold._TABLES.clear()  # tables whose samples the patched bound chose


@pytest.fixture
def without_bracket(monkeypatch):
    """The radix passes alone, with their survivor compaction."""
    _bracket_segments_above(monkeypatch, 1 << 62)
    yield
    threshold._TABLES.clear()


def _bits(t: torch.Tensor) -> int:
    """The fp32 bit pattern of a 0-dim tensor: tells -0.0 from +0.0."""
    return t.float().reshape(1).view(torch.int32).item()


def _from_patterns(patterns: torch.Tensor, dtype) -> torch.Tensor:
    """Values with the given bit patterns of `dtype` (int32 for fp32, int16 for 16-bit)."""
    if dtype == torch.float32:
        return patterns.to(torch.int32).view(torch.float32)
    return patterns.to(torch.int16).view(dtype)


def _random_signs(x: torch.Tensor, seed: int) -> torch.Tensor:
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(signs.bool(), -x, x)


def _check_threshold_and_masks(xs, ks, sparsities=(0.3, 0.5, 0.77)):
    """Exact threshold for each k, and identical masks in both scopes, against torch_ref."""
    for k in ks:
        got = dk.kth_smallest_abs(xs, k)
        expected = torch_ref.kth_smallest_abs(xs, k)
        assert got.dtype == expected.dtype and got.shape == ()
        assert _bits(got) == _bits(expected), f"k={k}: {got.item()} != {expected.item()}"
    for sparsity in sparsities:
        for scope in ("layer", "global"):
            got = dk.magnitude_masks(xs, sparsity, scope)
            expected = torch_ref.magnitude_masks(xs, _oracle.counts(xs, sparsity, scope),
                                                  scope)
            for i, (g, e) in enumerate(zip(got, expected)):
                assert g.dtype == torch.bool and g.is_contiguous() and g.shape == e.shape
                assert torch.equal(g, e), f"{scope} sparsity={sparsity}: mask {i} differs"


# One 16-bit or 32-bit pattern near 1.0 per dtype, and how many low mantissa bits it has.
_BASES = {torch.float32: (0x3F800000, 23), torch.float16: (0x3C00, 10),
          torch.bfloat16: (0x3F80, 7)}


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_inside_a_heavily_tied_bucket(dtype, bracket):
    # 40,000 values that share every bit above the lowest 4 of the mantissa: all land in one
    # bucket of every pass but the last, 16 distinct values each tied ~2,500 times.
    base, _ = _BASES[dtype]
    low = torch.randint(0, 16, (40_000,), generator=torch.Generator().manual_seed(0))
    x = _random_signs(_from_patterns(base + low, dtype), seed=1).to(DEVICE)
    _check_threshold_and_masks([x], ks=[1, 2_499, 2_500, 20_001, 39_999, 40_000])


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("digit", range(4))
def test_every_pass_narrows_its_digit(digit, bracket):
    # fp32 patterns equal except in one radix digit: only that pass can tell them apart, so
    # skipping or mis-shifting any of the four passes gives a wrong threshold.
    from dsd_kernels.backends.triton.threshold import DIGITS
    shift, width = DIGITS[digit]
    # digit 0 is the top of the exponent: stay below the all-ones exponent (Inf/NaN)
    high = (1 << width) - 1 if digit == 0 else 1 << width
    values = torch.randint(0, high, (20_000,), generator=torch.Generator().manual_seed(digit))
    base = 0x00800000 if digit == 0 else 0x3F000000
    patterns = (base & ~(((1 << width) - 1) << shift)) | (values << shift)
    x = _random_signs(_from_patterns(patterns, torch.float32), seed=digit).to(DEVICE)
    _check_threshold_and_masks([x], ks=[1, 777, 10_000, 19_999], sparsities=(0.5,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowest_mantissa_bit_decides(dtype):
    # Two values one unit in the last place apart: fp16's last bit is in the third digit,
    # fp32's in the fourth, so a dtype given too few passes merges them.
    base, _ = _BASES[dtype]
    x = _from_patterns(torch.tensor([base + 1, base, base + 1, base]), dtype).to(DEVICE)
    _check_threshold_and_masks([x], ks=[1, 2, 3, 4], sparsities=(0.5,))


@pytest.mark.slow  # seconds per case in the interpreter
def test_list_of_very_different_sizes_and_dtypes(bracket):
    # Sizes around the block (2048) and chunk (32768) boundaries, single elements, an empty
    # tensor and 0-dim; integer values make ties across tensors (and across dtype groups,
    # which are launched separately), so the position order of ties is exercised.
    generator = torch.Generator().manual_seed(3)
    shapes = [(1,), (2047,), (), (2048,), (0,), (2049,), (1,), (32_769,), (7, 3), (33, 1000)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    xs = [torch.randint(-6, 7, shape, generator=generator).to(dtypes[i % 3]).to(DEVICE)
          for i, shape in enumerate(shapes)]
    n = sum(x.numel() for x in xs)
    _check_threshold_and_masks(xs, ks=[1, 5_000, n // 2, n], sparsities=(0.0, 0.42, 0.999))


def test_signed_zeros_are_one_value(bracket):
    # -0.0 and +0.0 tie as |x| = 0 (pattern 0): the threshold is +0.0 and the first zeros in
    # position order are pruned whatever their sign.
    x = torch.tensor([-0.0, 0.0, 2.0, -0.0, -1.0, 0.0, 0.0, -0.0] * 500, device=DEVICE)
    _check_threshold_and_masks([x], ks=[1, 1_000, 3_000], sparsities=(0.3, 0.6))
    assert _bits(dk.kth_smallest_abs(x, 1)) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_denormals(dtype, bracket):
    # The smallest subnormals of each dtype (and zeros): patterns 1..63 at the very bottom.
    patterns = torch.randint(0, 64, (10_000,), generator=torch.Generator().manual_seed(4))
    x = _random_signs(_from_patterns(patterns, dtype), seed=5).to(DEVICE)
    assert (x != 0).any() and (x.float().abs().max() < torch.finfo(dtype).tiny)
    _check_threshold_and_masks([x], ks=[1, 200, 5_000, 10_000])


def _survivors(xs, ranks, segments):
    """Each segment's final mode (2: its last passes read compacted survivors, 0: it read
    its tensors in every pass) and how many survivors it appended."""
    _, _, modes, counts, _ = threshold._radix_select(xs, ranks, segments)
    return modes.tolist(), counts.tolist()


def _bucket(xs, k, shift):
    """How many |x| share the bits above `shift` of the k-th smallest |x|'s fp32 pattern:
    the candidates of the pass after the one whose digit ends at `shift`."""
    patterns = torch.cat([x.detach().cpu().float().abs().reshape(-1) for x in xs]).view(
        torch.int32)
    kth = patterns.sort().values[k - 1]
    return int(((patterns >> shift) == (kth >> shift)).sum())


def _log_uniform(n, low, high, dtype, seed):
    """Random-signed magnitudes 2**U(low, high): spread over many binades."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.exp2(torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low)
    return _random_signs(x.to(dtype), seed + 1).to(DEVICE)


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_survivors_compacted_after_the_first_pass(dtype, without_bracket):
    # Magnitudes over 26 binades: the top 7 bits (binade pairs) leave <= 1/4 of them in the
    # k-th value's bucket, so pass 2 appends that bucket and passes 3 (and 4) read only it.
    from dsd_kernels.backends.triton.threshold import DIGITS, SURVIVOR_SHARE
    x = _log_uniform(40_000, -13, 13, dtype, seed=20)
    ks = [1, 3_333, 20_000, 40_000]
    for k in ks:
        bucket = _bucket([x], k, DIGITS[0][0])
        assert bucket <= x.numel() // SURVIVOR_SHARE
        assert _survivors([x], [k], [0]) == ([2], [bucket]), f"k={k}"
    _check_threshold_and_masks([x], ks)


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_survivors_compacted_after_the_second_pass(dtype, without_bracket):
    # Normal weights: the k-th value's binade pair holds more than 1/4 of them, its top 15
    # bits ~1%. fp32 appends that bucket in pass 3 for pass 4; fp16 (3 passes) and bf16 (2)
    # have no pass left to profit, so they read their tensors in every pass.
    from dsd_kernels.backends.triton.threshold import DIGITS, SURVIVOR_SHARE
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(21)).to(dtype).to(DEVICE)
    ks = [9_000, 20_000, 31_000]
    for k in ks:
        assert _bucket([x], k, DIGITS[0][0]) > x.numel() // SURVIVOR_SHARE
        expected = ([2], [_bucket([x], k, DIGITS[1][0])]) if dtype == torch.float32 \
            else ([0], [0])
        assert _survivors([x], [k], [0]) == expected, f"k={k}"
    _check_threshold_and_masks([x], ks)


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("over", [0, 1])
def test_survivor_capacity_is_exact_and_overflow_falls_back(over, without_bracket):
    # 4,000 fp32 values have room for 1,000 survivors. A bucket that shares its top 15 bits
    # and holds 1,000 values is compacted after pass 1; with 1,001 it fits after no pass, so
    # every pass reads the tensor (the fallback) and the result is the same.
    from dsd_kernels.backends.triton.threshold import SURVIVOR_SHARE
    generator = torch.Generator().manual_seed(22)
    small = 0x30000000 + torch.randint(0, 1 << 24, (1_500,), generator=generator)
    bucket = 0x3F800000 + torch.randint(0, 1 << 16, (1_000 + over,), generator=generator)
    large = 0x41000000 + torch.randint(0, 1 << 23, (1_500 - over,), generator=generator)
    patterns = torch.cat([small, bucket, large])[torch.randperm(4_000, generator=generator)]
    x = _random_signs(_from_patterns(patterns, torch.float32), seed=23).to(DEVICE)
    assert x.numel() // SURVIVOR_SHARE == 1_000
    ks = [1_501, 2_000, 2_500 + over]
    for k in ks:
        assert _survivors([x], [k], [0]) == (([2], [1_000]) if over == 0 else ([0], [0]))
    _check_threshold_and_masks([x], ks, sparsities=(0.5,))


@pytest.mark.slow  # seconds per case in the interpreter
def test_survivors_of_many_chunks_from_mixed_dtypes(without_bracket):
    # Global scope over three dtype groups (three launches append to one survivor region)
    # whose bucket after pass 1 (~23.5% of 150,000) fills more than one survivor chunk.
    from dsd_kernels.backends.triton.threshold import CHUNK, DIGITS
    xs = [_log_uniform(n, 0, 8.5, dtype, seed=24 + i) for i, (n, dtype) in
          enumerate([(100_000, torch.float32), (30_000, torch.float16),
                     (20_000, torch.bfloat16)])]
    k = 75_000
    bucket = _bucket(xs, k, DIGITS[0][0])
    assert bucket > CHUNK
    assert _survivors(xs, [k], [0, 0, 0]) == ([2], [bucket])
    got = dk.kth_smallest_abs(xs, k)
    assert _bits(got) == _bits(torch_ref.kth_smallest_abs(xs, k))
    masks = dk.magnitude_masks(xs, 0.5, "global")
    expected = torch_ref.magnitude_masks(xs, _oracle.counts(xs, 0.5, "global"), "global")
    assert all(torch.equal(g, e) for g, e in zip(masks, expected))


@pytest.mark.slow  # seconds per case in the interpreter
def test_survivors_decided_per_segment(without_bracket):
    # scope="layer": one call, three fates. A spread tensor compacts after pass 1, a normal
    # one after pass 2, a tied one never; a fp16 tensor beside them shares fp32's 4 passes.
    from dsd_kernels.backends.triton.threshold import DIGITS
    tied = _from_patterns(0x3F800000 + torch.randint(
        0, 16, (20_000,), generator=torch.Generator().manual_seed(25)), torch.float32)
    xs = [_log_uniform(20_000, -13, 13, torch.float32, seed=26),
          torch.randn(30_000, generator=torch.Generator().manual_seed(27)).to(DEVICE),
          tied.to(DEVICE), _log_uniform(10_000, -9, 9, torch.float16, seed=28)]
    ranks = [10_000, 15_000, 10_000, 5_000]
    expected_counts = [_bucket([xs[0]], ranks[0], DIGITS[0][0]),
                       _bucket([xs[1]], ranks[1], DIGITS[1][0]), 0,
                       _bucket([xs[3]], ranks[3], DIGITS[0][0])]
    assert _survivors(xs, ranks, [0, 1, 2, 3]) == ([2, 2, 0, 2], expected_counts)
    _check_threshold_and_masks(xs, ks=[1, 40_000], sparsities=(0.5,))


def _outcomes(xs, ranks, segments):
    """Each segment's bracket outcome and its survivor count."""
    _, _, _, counts, outcomes = threshold._radix_select(xs, ranks, segments)
    return outcomes.tolist(), counts.tolist()


AT_BOUND, INSIDE, MISSED = (threshold._AT_BOUND.value, threshold._INSIDE.value,
                            threshold._MISSED.value)


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bracket_reads_the_weights_once_and_keeps_few(dtype):
    # Normal weights: the sample's bracket holds the k-th smallest; the pass keeps the keys
    # inside it, and the radix passes read only those. With 4,096 sampled keys the bracket
    # spans 2 (4.5 sqrt(4,096 q (1 - q)) + 8) sample ranks: 7.4% of the keys at q = 1/2.
    x = torch.randn(60_000, generator=torch.Generator().manual_seed(40)).to(dtype).to(DEVICE)
    ks = [1, 600, 30_000, 59_400, 60_000]
    for k in ks:
        (outcome,), (kept,) = _outcomes([x], [k], [0])
        assert outcome in (AT_BOUND, INSIDE) and kept <= 0.08 * x.numel(), f"k={k}"
    _check_threshold_and_masks([x], ks, sparsities=(0.01, 0.5))


@pytest.mark.slow  # seconds per case in the interpreter
def test_a_tied_bracket_answers_at_its_bounds():
    # All equal, and two values: lo and hi are tied values, nothing lies between them.
    equal = torch.full((30_000,), -0.5, device=DEVICE)
    two = torch.where(torch.arange(30_000) % 3 == 0, 2.0, -1.0).to(DEVICE)
    for x in (equal, two):
        for k in (1, 10_000, 10_001, 30_000):
            assert _outcomes([x], [k], [0]) == ([AT_BOUND], [0]), f"k={k}"
        _check_threshold_and_masks([x], ks=[1, 10_000, 10_001, 30_000])


@pytest.mark.slow  # seconds per case in the interpreter
@pytest.mark.parametrize("scale", [0.0, 1e9])
def test_a_bracket_that_misses_falls_back_to_the_radix_passes(scale, monkeypatch):
    # A zero-width bracket misses the k-th smallest unless it is tied there; an infinitely
    # wide one holds every key strictly inside, more than the survivors' room.
    monkeypatch.setattr(threshold, "BRACKET_SCALE", scale)
    generator = torch.Generator().manual_seed(41)
    xs = [torch.randn(30_000, generator=generator).to(DEVICE),
          torch.randn(20_000, generator=generator).half().to(DEVICE)]
    ks = [7, 25_000, 49_990]
    for k in ks:
        assert _outcomes(xs, [k], [0, 0])[0] == [MISSED], f"k={k}"
    _check_threshold_and_masks(xs, ks, sparsities=(0.5,))


@pytest.mark.slow  # seconds per case in the interpreter
def test_brackets_decided_per_segment():
    # scope="layer": one bracket per segment of more than radix.BRACKETED_NUMEL keys, each
    # with its own outcome; a small tensor beside them is not bracketed.
    from dsd_kernels import radix
    generator = torch.Generator().manual_seed(42)
    xs = [torch.randn(20_000, generator=generator).to(DEVICE),
          torch.full((radix.BRACKETED_NUMEL + 1,), 3.0, device=DEVICE),
          torch.randn(radix.BRACKETED_NUMEL, generator=generator).to(DEVICE)]
    outcomes, _ = _outcomes(xs, [10_000, 5, 100], [0, 1, 2])
    assert outcomes == [INSIDE, AT_BOUND, threshold._NOT_BRACKETED.value]
    _check_threshold_and_masks(xs, ks=[1, 30_000], sparsities=(0.5,))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_layouts_rank_ties_by_logical_index(layout):
    # Ties must be ranked by logical flat index, not by memory order.
    base = torch.randint(-3, 4, (6, 5, 4, 3), generator=torch.Generator().manual_seed(6)).float()
    x = {"transposed": base.transpose(0, 3),
         "channels_last": base.to(memory_format=torch.channels_last),
         "sliced": base[:, ::2, 1:]}[layout].to(DEVICE)
    _check_threshold_and_masks([x, x.flip(0)], ks=[1, 50], sparsities=(0.5,))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_masks_zeroes_pruned_entries_even_nan(dtype, layout):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(5, 6, 7, 9, generator=generator).to(dtype)
    made = {"contiguous": lambda t: t, "channels_last": lambda t: t.to(
        memory_format=torch.channels_last), "sliced": lambda t: t[:, 1:, ::2]}[layout]
    x = made(base.to(DEVICE))
    x[0, 0, 0, 0], x[1, 1, 1, 1] = float("nan"), -1.0
    mask = (torch.rand(x.shape, generator=generator) > 0.5).to(DEVICE)
    mask[0, 0, 0, 0] = mask[1, 1, 1, 1] = False
    expected = x.clone()
    torch_ref.apply_masks_([expected], [mask])
    strides = x.stride()
    dk.apply_masks_([x, x.new_ones(3)], [mask, torch.tensor([True, False, True], device=DEVICE)])
    assert x.stride() == strides
    assert torch.equal(x.float().view(torch.int32), expected.float().view(torch.int32))
    assert _bits(x[0, 0, 0, 0]) == 0 and _bits(x[1, 1, 1, 1]) == 0  # +0.0, not NaN or -0.0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_fill_pruned_mixed_dtypes_and_layouts_write_fills_bits(layout):
    # One launch per dtype group: each tensor must get its own value, in its own dtype.
    generator = torch.Generator().manual_seed(8)
    made = {"contiguous": lambda t: t, "channels_last": lambda t: t.to(
        memory_format=torch.channels_last), "sliced": lambda t: t[:, 1:, ::2]}[layout]
    xs = [made(torch.randn(5, 6, 7, 9, generator=generator).to(dtype).to(DEVICE))
          for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float32)]
    xs[0][0, 0, 0, 0] = float("nan")
    masks = [(torch.rand(x.shape, generator=generator) > 0.5).to(DEVICE) for x in xs]
    values = [1 + 2**-11 + 2**-40, -0.0, 1e-2, float("-nan")]
    expected = [x.clone().masked_fill_(~m, v) for x, m, v in zip(xs, masks, values)]
    strides = [x.stride() for x in xs]
    dk.fill_pruned_(xs, masks, values)
    for x, want, stride in zip(xs, expected, strides):
        assert x.stride() == stride
        bits = {4: torch.int32, 2: torch.int16}[x.element_size()]
        assert torch.equal(x.contiguous().view(bits), want.contiguous().view(bits))


def _params(dtypes, seed):
    """Mixed shapes and layouts: channels_last conv weights, a transposed matrix, a bias."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (16_900,), (7, 11), (1,), (4, 5, 2, 2)]  # 16,900: full + tail chunk
    params = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=generator).to(dtypes[i % len(dtypes)]).to(DEVICE)
        if p.dim() == 4:
            p = p.to(memory_format=torch.channels_last)
        elif p.dim() == 2:
            p = p.t()
        params.append(p)
    return params


def _clones(tensors):
    return [None if t is None else t.clone(memory_format=torch.preserve_format) for t in tensors]


def _assert_close(got, expected, masks=None):
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.stride() == e.stride(), f"tensor {i} changed layout"
        torch.testing.assert_close(g, e, **TOLERANCES[g.dtype], msg=f"tensor {i}")
        if masks is not None and masks[i] is not None:
            assert (g[~masks[i]].float().view(torch.int32) == 0).all(), f"tensor {i}: not +0.0"


def _masks_for(params, seed):
    generator = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(p.shape, generator=generator) > 0.4).to(DEVICE) for p in params]
    masks[3] = None  # a parameter without a mask is updated densely
    return masks


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float16], [torch.bfloat16], DTYPES])
@pytest.mark.parametrize("config", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True, weight_decay=0.1),
])
def test_masked_sgd_matches_reference(dtypes, config):
    params = _params(dtypes, seed=8)
    masks = _masks_for(params, seed=9)
    grads = [torch.randn_like(p) * 100 for p in params]
    buffers = [torch.randn_like(p) for p in params] if config.get("momentum") else []
    grad_scale = torch.tensor(100.0, device=DEVICE)
    outputs = {}
    for backend in ("torch", "triton"):
        dk.use_backend(backend)
        ps, bs = _clones(params), _clones(buffers)
        dk.masked_sgd_(ps, _clones(grads), bs, masks, **config, grad_scale=grad_scale)
        outputs[backend] = ps + bs
    _assert_close(outputs["triton"], outputs["torch"], masks * 2)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float16], [torch.bfloat16], DTYPES])
@pytest.mark.parametrize("config", [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8),
    dict(lr=1e-2, beta1=0.3, beta2=0.99, eps=1e-6, weight_decay=0.1, maximize=True),
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True),
])
def test_masked_adam_matches_reference(dtypes, config):
    params = _params(dtypes, seed=10)
    masks = _masks_for(params, seed=11)
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.randn_like(p) * 0.1 for p in params]
    exp_avg_sqs = [torch.rand_like(p) * 0.01 for p in params]
    steps = [1, 2, 10, 1000, 3]  # per-tensor steps give per-tensor bias corrections
    outputs = {}
    for backend in ("torch", "triton"):
        dk.use_backend(backend)
        ps, ms, vs = _clones(params), _clones(exp_avgs), _clones(exp_avg_sqs)
        dk.masked_adam_(ps, _clones(grads), ms, vs, masks, steps, **config)
        outputs[backend] = ps + ms + vs
    _assert_close(outputs["triton"], outputs["torch"], masks * 3)


def _model():
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    return model.to(DEVICE).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("optimizers", [
    (dk.MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                         weight_decay=1e-3)),
    (dk.MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (dk.MaskedAdam, torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2)),
    (dk.MaskedAdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
], ids=["sgd", "sgd-nesterov", "adam", "adamw"])
def test_optimizer_classes_match_torch_optim(optimizers):
    # Channels-last conv weights give channels-last state (zeros_like preserves the format);
    # all-True masks must reproduce torch.optim, and an LR schedule runs in between.
    masked_class, torch_class, config = optimizers
    ours, theirs = _model(), _model()
    opt_ours = masked_class(ours.parameters(), **config)
    opt_theirs = torch_class(theirs.parameters(), **config, foreach=False)
    opt_ours.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in ours.parameters()})
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
                 for o in (opt_ours, opt_theirs)]
    inputs = torch.randn(4, 3, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    for _ in range(5):
        for model, opt, schedule in ((ours, opt_ours, schedules[0]),
                                     (theirs, opt_theirs, schedules[1])):
            opt.zero_grad()
            model(inputs).square().mean().backward()
            opt.step()
            schedule.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])
        for name, value in opt_theirs.state[q].items():
            torch.testing.assert_close(opt_ours.state[p][name], value,
                                       **TOLERANCES[torch.float32], msg=name)


def test_masked_optimizer_keeps_pruned_weights_and_state_zero():
    model = _model()
    opt = dk.MaskedAdamW(model.parameters(), lr=1e-2)
    weights = [model[0].weight, model[3].weight]
    masks = dk.magnitude_masks(weights, 0.6, "global")
    opt.set_masks(dict(zip(weights, masks)))
    inputs = torch.randn(4, 3, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    for _ in range(3):
        opt.zero_grad()
        model(inputs).square().mean().backward()
        opt.step()
    for w, mask in zip(weights, masks):
        for t in (w, opt.state[w]["exp_avg"], opt.state[w]["exp_avg_sq"]):
            assert (t[~mask] == 0).all() and (t[mask] != 0).any()


def test_tables_are_cached_per_stream(monkeypatch):
    """A table is read only on the stream that uploaded it: a call on another stream builds
    and uploads its own, and each stream keeps hitting its own entries. Streams are stand-ins
    here; tests/test_triton_streams.py races real ones on a GPU."""
    from dsd_kernels.backends.triton import mask, optim, tables
    stream = ["A"]
    monkeypatch.setattr(tables, "current_stream", lambda device: stream[0])
    caches = (threshold._TABLES, mask._TABLES, mask._FILL_TABLES, optim._TABLES)
    generator = torch.Generator().manual_seed(13)
    xs = [torch.randn(300, generator=generator).to(DEVICE),
          torch.randn(7, 9, generator=generator).half().to(DEVICE)]
    grads = [torch.randn_like(x) for x in xs]
    buffers = [torch.zeros_like(x) for x in xs]
    kept = [x.abs() > 0.5 for x in xs]  # the same masks every call: new ones move

    def call_every_op():
        expected = torch_ref.kth_smallest_abs(xs, 100)
        assert _bits(dk.kth_smallest_abs(xs, 100)) == _bits(expected)
        masks = dk.magnitude_masks(xs, 0.5, "layer")
        expected = torch_ref.magnitude_masks(xs, _oracle.counts(xs, 0.5, "layer"), "layer")
        assert all(torch.equal(m, e) for m, e in zip(masks, expected))
        dk.apply_masks_(xs, kept)
        dk.masked_sgd_(xs, grads, buffers, kept, lr=0.1, momentum=0.9)
        return [cache.builds for cache in caches]

    first = call_every_op()
    assert call_every_op() == first  # cached on A
    stream[0] = "B"
    on_b = call_every_op()
    assert all(b > a for a, b in zip(first, on_b)), (first, on_b)
    stream[0] = "A"
    assert call_every_op() == on_b  # A's tables are still A's
    stream[0] = "B"
    assert call_every_op() == on_b


@triton.jit
def _program_order_kernel(counter_ptr, order_ptr):
    """Each program takes the next slot and writes its linear index there."""
    slot = tl.atomic_add(counter_ptr, 1)
    program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2)
    tl.store(order_ptr + slot, program + tl.program_id(2))


def _program_order(grid=(8, 4, 2)):
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    order = torch.full((grid[0] * grid[1] * grid[2],), -1, dtype=torch.int32, device=DEVICE)
    _program_order_kernel[grid](counter, order)
    return order.tolist()


@pytest.mark.skipif(DEVICE == "cuda" or "DSD_TRITON_SHUFFLE" in os.environ,
                    reason="the interpreter's own program order")
def test_shuffled_programs_run_in_a_seeded_random_order(monkeypatch):
    assert _program_order() == list(range(64))  # what hides a dependency between programs
    shuffle_programs(monkeypatch.setattr, seed=3)
    first, second = _program_order(), _program_order()
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != list(range(64)) and second != first  # each launch its own order
    monkeypatch.undo()
    shuffle_programs(monkeypatch.setattr, seed=3)
    assert _program_order() == first


# Fast cases of every kernel family, each launch's programs in a random order: a program that
# reads what another of its launch writes would see a different answer (conftest.py). Sizes
# give every launch several programs: full and tail chunks of each module's CHUNK.
_MANY_CHUNKS = 2 * max(threshold.CHUNK, 16_384) + 100


def _shuffled_weights():
    generator = torch.Generator().manual_seed(14)
    ties = torch.randint(-40, 40, (_MANY_CHUNKS,), generator=generator) / 8  # ties across chunks
    return [ties.to(DEVICE), torch.randn(20_000, generator=generator).half().to(DEVICE),
            torch.randn(7, 9, generator=generator).bfloat16().to(DEVICE)]


def test_thresholds_and_masks_in_any_program_order(shuffled_programs, bracket):
    xs = _shuffled_weights()
    _check_threshold_and_masks(xs, ks=[1, 30_001], sparsities=(0.5,))


def test_histogram_in_any_program_order(shuffled_programs):
    xs = _shuffled_weights()
    prefixes = torch.tensor([0, 0x3F], dtype=torch.int64, device=DEVICE)
    args = (xs, [0, 1, 1], prefixes, 24, 8)
    assert torch.equal(torch.ops.dsd.magnitude_histogram(*args),
                       torch_ref.magnitude_histogram(*args))


def test_apply_and_optimizers_in_any_program_order(shuffled_programs):
    params = _shuffled_weights()
    masks = [x.abs() > 0.5 for x in params]
    grads = [torch.randn_like(p) for p in params]
    outputs = {}
    for backend in ("torch", "triton"):
        dk.use_backend(backend)
        ps, ms = _clones(params), [torch.zeros_like(p) for p in params]
        vs = [g.square() for g in grads]
        dk.apply_masks_(ps, masks)
        dk.masked_sgd_(ps, grads, ms, masks, lr=0.1, momentum=0.9)
        dk.masked_adam_(ps, grads, ms, vs, masks, [3] * 3, lr=1e-2, beta1=0.9, beta2=0.999,
                        eps=1e-8)
        outputs[backend] = ps + ms + vs
    _assert_close(outputs["triton"], outputs["torch"], masks * 3)


def _launch_spy(monkeypatch, kernel):
    """Record each launch's constexpr arguments and its runtime arguments."""
    constexprs = {name for name, parameter in inspect.signature(kernel.fn).parameters.items()
                  if "constexpr" in str(parameter.annotation)}
    launches = []
    run = kernel.run

    def spy(*args, **kwargs):
        launches.append(({k: v for k, v in kwargs.items() if k in constexprs},
                         {k: v for k, v in kwargs.items() if k not in constexprs}))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    return launches


def test_lr_schedule_does_not_recompile(monkeypatch):
    from dsd_kernels.backends.triton import optim as triton_optim
    kernel = triton_optim._masked_optim_kernel
    launches = _launch_spy(monkeypatch, kernel)
    compiled = (lambda: len(kernel.device_caches[torch.cuda.current_device()][0])) \
        if DEVICE == "cuda" else (lambda: 0)
    p = torch.randn(1000, device=DEVICE)
    ms, vs = torch.zeros_like(p), torch.zeros_like(p)
    for step, lr in enumerate([1e-3, 5e-4, 2.5e-4], start=1):
        dk.masked_adam_([p], [torch.randn_like(p)], [ms], [vs], None, step, lr=lr,
                        beta1=0.9 - step * 0.01, beta2=0.999, eps=1e-8, weight_decay=lr)
        if step == 1:
            compiled_after_first = compiled()
    assert [runtime["lr"] for _, runtime in launches] == [1e-3, 5e-4, 2.5e-4]
    assert all(constexprs == launches[0][0] for constexprs, _ in launches)
    assert compiled() == compiled_after_first


@pytest.mark.slow  # seconds per case in the interpreter
def test_ops_pass_opcheck():
    x = torch.randn(300, device=DEVICE)
    ys = [torch.randn(40, device=DEVICE), torch.randn(3, 5, device=DEVICE).half()]
    mask = x.abs() > 0.5
    p, g = torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE)
    m, v = torch.zeros(300, device=DEVICE), torch.zeros(300, device=DEVICE)
    ops = torch.ops.dsd
    cases = [
        (ops.kth_smallest_abs, ([x, *ys], 100)),
        (ops.magnitude_masks, ([x, *ys], _oracle.counts([x, *ys], 0.5, "global"), "global")),
        (ops.apply_masks_, ([x], [mask])),
        (ops.fill_pruned_, ([x, *ys], [mask, *(y > 0 for y in ys)], [0.5, -0.0, 2.0])),
        (ops.masked_sgd_, ([p], [g], [m], [mask], 0.1, 0.9, 0.0, 0.0, False, False, None)),
        (ops.masked_adam_, ([p], [g], [m], [v], [None], [2.0], 1e-3, 0.9, 0.999, 1e-8, 0.0,
                            True, False, torch.tensor(2.0, device=DEVICE))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_ops_inside_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def prune_and_step(ws, grads, buffers):
        masks = torch.ops.dsd.magnitude_masks(ws, [50, 31], "layer")
        torch.ops.dsd.masked_sgd_(ws, grads, buffers, masks, 0.1, 0.9, 0.0, 0.0, False, False,
                                  None)
        return masks

    ws = [torch.randn(100, device=DEVICE), torch.randn(7, 9, device=DEVICE)]
    grads = [torch.randn_like(w) for w in ws]
    expected_ws, buffers = _clones(ws), [torch.zeros_like(w) for w in ws]
    expected_buffers = _clones(buffers)
    masks = prune_and_step(ws, grads, buffers)
    expected_masks = torch_ref.magnitude_masks(expected_ws, [50, 31], "layer")
    torch_ref.masked_sgd_(expected_ws, grads, expected_buffers, expected_masks, 0.1, 0.9, 0.0,
                          0.0, False, False, None)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected_masks))
    _assert_close(ws + buffers, expected_ws + expected_buffers)


def test_load_serves_cuda_and_interpreted_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.load().dispatch_keys == ("CUDA", "CPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = triton_backend.load()
    assert backend.dispatch_keys == ("CUDA",)
    assert set(backend.kernels) == set(torch_ref.KERNELS)


def test_load_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        triton_backend.load()
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    with pytest.raises(BackendUnavailable, match="triton cannot be imported"):
        triton_backend.load()
