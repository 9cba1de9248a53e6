"""Exact k-th smallest |x| over a list of tensors: radix select on fp32 bit patterns.

Non-negative floats order exactly like their bit patterns read as integers, and fp16/bf16
magnitudes are exact in fp32, so the k-th smallest |x| is the k-th smallest 31-bit pattern of
|x| (sign cleared, so -0.0 is +0.0). It is found one digit at a time from the top: a pass
histograms one digit of the patterns that still share the prefix chosen so far (a local
`tl.histogram` per program, flushed to global memory once per program), then one program per
segment picks the digit whose cumulative count reaches the wanted rank, appends it to the
prefix and makes the rank relative to that digit. Prefix and rank stay in device buffers
between passes: a threshold costs no host synchronisation at all.

A segment is a set of tensors ranked together: one per tensor for scope="layer", one for all
of them for scope="global" and for `kth_smallest_abs`. The tensors are read where they lie
(dense ones in memory order: the order does not change a k-th value), never concatenated.
"""

import torch
import triton
import triton.language as tl

from ..._ops import magnitude_dtype
from . import tables
from .tables import lanes
from .convert import to_fp32

# (shift, width) of each digit, most significant first: bits 30..24, 23..16, 15..8, 7..0.
# At most 256 bins: tl.histogram costs log2(bins) warp ballots plus bins/32 popcounts per
# value on the GPU, which 256 bins keep near the cost of reading the value.
DIGITS = ((24, 7), (16, 8), (8, 8), (0, 8))
BINS = 256
# Digits a dtype needs: below its mantissa the fp32 pattern is zero (fp16: bits 12..0,
# bf16: bits 15..0), so the last digits of a list without fp32 are zero and need no pass.
PASSES = {torch.float32: 4, torch.float16: 3, torch.bfloat16: 2}
BLOCK = 2048  # elements per tl.histogram call
CHUNK = 16 * BLOCK  # elements per program; its local histogram is flushed once
NUM_WARPS = 8

# Columns of the per-tensor row table (int64).
_ADDRESS = tl.constexpr(0)
_NUMEL = tl.constexpr(1)
_SEGMENT = tl.constexpr(2)
_COLUMNS = tl.constexpr(3)


@triton.jit
def magnitude_pattern(x):
    """The fp32 bit pattern of |x| as int32. The sign is cleared on the bits: no float op
    touches x, so no subnormal can be flushed to zero."""
    return to_fp32(x).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _threshold_histogram_kernel(rows_ptr, chunk_rows_ptr, chunk_starts_ptr, prefix_ptr,
                                histograms_ptr, DTYPE: tl.constexpr, SHIFT: tl.constexpr,
                                WIDTH: tl.constexpr, BINS: tl.constexpr, ALIGNED: tl.constexpr,
                                FULL: tl.constexpr, CHUNK: tl.constexpr,
                                BLOCK: tl.constexpr):
    """Count digit (pattern >> SHIFT) % 2**WIDTH of one chunk's patterns whose higher bits
    equal their segment's prefix, into histograms[segment]."""
    chunk = tl.program_id(0)
    row = rows_ptr + tl.load(chunk_rows_ptr + chunk).to(tl.int64) * _COLUMNS
    start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)  # chunks start aligned
    x_ptr = tl.load(row + _ADDRESS).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # the hint must sit on the pointer itself, not on the integer address
        x_ptr = tl.multiple_of(x_ptr, 16)
    x_ptr += start
    remaining = tl.load(row + _NUMEL) - start
    segment = tl.load(row + _SEGMENT)
    prefix = tl.load(prefix_ptr + segment)

    counts = tl.zeros([BINS], dtype=tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        inside = lanes(index, remaining, FULL, BLOCK)
        pattern = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0.0))
        candidate = inside & ((pattern >> (SHIFT + WIDTH)) == prefix)
        digit = (pattern >> SHIFT) & ((1 << WIDTH) - 1)
        counts += tl.histogram(digit, BINS, mask=candidate)
    bins = tl.arange(0, BINS)
    tl.atomic_add(histograms_ptr + segment * BINS + bins, counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _threshold_select_kernel(histograms_ptr, prefix_ptr, rank_ptr, WIDTH: tl.constexpr,
                             BINS: tl.constexpr):
    """For one segment: append the digit that holds the rank-th candidate to the prefix, make
    the rank relative to that digit, and clear the histogram for the next pass."""
    segment = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, BINS)
    counts = tl.load(histograms_ptr + segment * BINS + bins)
    rank = tl.load(rank_ptr + segment)
    digit = tl.sum((tl.cumsum(counts, 0) < rank).to(tl.int32), 0)
    below = tl.sum(tl.where(bins < digit, counts, 0), 0)
    tl.store(rank_ptr + segment, rank - below)
    prefix = tl.load(prefix_ptr + segment)
    tl.store(prefix_ptr + segment, (prefix << WIDTH) | digit)
    tl.store(histograms_ptr + segment * BINS + bins, tl.zeros_like(counts))


def radix_select(xs, ranks, segments):
    """Per segment, the rank-th smallest |x| of its tensors (ranks[s] >= 1) as an int32 fp32
    pattern, and how many entries equal to it are among the rank smallest (the ties to take).

    `xs` are dense in memory and on one device; `segments[i]` is the segment of xs[i].
    Returns two device tensors of one entry per segment; nothing is synchronised.
    """
    device = xs[0].device
    passes = max(PASSES[x.dtype] for x in xs)
    groups, (rank,) = tables.grouped(
        device, xs, lambda i: [xs[i].data_ptr(), xs[i].numel(), segments[i]], 1, CHUNK,
        torch.tensor(ranks, dtype=torch.int64))
    prefix = torch.zeros(len(ranks), dtype=torch.int32, device=device)
    histograms = torch.zeros(len(ranks), BINS, dtype=torch.int64, device=device)
    with tables.on_device(device):
        for shift, width in DIGITS[:passes]:
            for group in groups:
                for full, chunk_rows, chunk_starts in group.launches():
                    _threshold_histogram_kernel[(chunk_rows.numel(),)](
                        group.rows, chunk_rows, chunk_starts, prefix, histograms,
                        DTYPE=group.dtype, SHIFT=shift, WIDTH=width, BINS=BINS,
                        ALIGNED=group.aligned, FULL=full, CHUNK=CHUNK, BLOCK=BLOCK,
                        num_warps=NUM_WARPS)
            _threshold_select_kernel[(len(ranks),)](histograms, prefix, rank, WIDTH=width,
                                                    BINS=BINS)
    return prefix << DIGITS[passes - 1][0], rank


def dense(xs):
    """The tensors as dense memory blocks: copies only those that are not."""
    return [x if tables.dense_in_memory(x) else x.contiguous() for x in xs]


def kth_smallest_abs(xs, k):
    pattern, _ = radix_select(dense(xs), [k], [0] * len(xs))
    return pattern.view(torch.float32).reshape(()).to(magnitude_dtype(xs))
