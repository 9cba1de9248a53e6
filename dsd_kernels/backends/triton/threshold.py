"""Exact k-th smallest |x| over a list of tensors: a sampled bracket, then radix passes over
fp32 bit patterns of |x|, with survivor compaction. Nothing synchronises with the host: prefix,
rank and each segment's mode stay in device buffers, and the host launches the same kernels
whatever the outcome.

See docs/design.md, The bracket and Radix passes (survivor compaction, reads per threshold).

A segment is a set of tensors ranked together: one per tensor for scope="layer", one for all
of them for scope="global" and for `kth_smallest_abs`. The tensors are read where they lie,
never concatenated. Tables that depend only on the tensors and their segments are cached
(tables.Cache); the ranks, which the select kernel updates, are sent with each call.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import radix
from ..._ops import magnitude_dtype
from ...radix import DIGITS, PASSES
from . import tables
from .convert import to_fp32
from .tables import blocks_end, column_pointer, lanes

# The widest digit's bins (radix.DIGITS): what tl.histogram costs per value depends on the
# bin count and on the Triton version (docs/design.md, "How Triton lowers tl.histogram").
BINS = 256
BLOCK = 2048  # elements per tl.histogram call (and per survivor slot reservation)
CHUNK = 16 * BLOCK  # elements per program; its local histogram is flushed once
NUM_WARPS = 8
# A segment of n elements has room for n // SURVIVOR_SHARE survivors: compaction pays when
# the bucket is well below the data (writing b and reading it twice must beat a full read),
# and the buffer costs at most one byte per element.
SURVIVOR_SHARE = 4

# Columns of the per-tensor row table (int64).
_ADDRESS = tl.constexpr(0)
_NUMEL = tl.constexpr(1)
_SEGMENT = tl.constexpr(2)
_COLUMNS = tl.constexpr(3)

# Where a segment's pass reads its candidates (one int32 per segment, on the device).
_FROM_TENSORS = tl.constexpr(0)
_APPENDING = tl.constexpr(1)  # from the tensors, appending the candidates to the survivors
_FROM_SURVIVORS = tl.constexpr(2)
_DONE = tl.constexpr(3)  # the bracket's pass found the k-th smallest at lo or hi
_BRACKETING = tl.constexpr(4)  # before the bracket's pass

# A segment's bracket's outcome (one int32 per segment, for tests).
_NOT_BRACKETED = tl.constexpr(0)
_AT_BOUND = tl.constexpr(1)  # the k-th smallest is lo or hi
_INSIDE = tl.constexpr(2)  # among the survivors
_MISSED = tl.constexpr(3)  # outside the bracket, or more survivors than room

BRACKET_SCALE = 1.0  # radix.bracket_ranks' scale (0 in tests: brackets that miss)


@triton.jit
def magnitude_pattern(x):
    """The fp32 bit pattern of |x| as int32. The sign is cleared on the bits: no float op
    touches x, so no subnormal can be flushed to zero."""
    return to_fp32(x).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _candidate_digits(pattern, inside, prefix, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                      BINS: tl.constexpr):
    """Which patterns share the prefix, and the histogram of their digit."""
    candidate = inside & ((pattern >> (SHIFT + WIDTH)) == prefix)
    digit = (pattern >> SHIFT) & ((1 << WIDTH) - 1)
    return candidate, tl.histogram(digit, BINS, mask=candidate)


@triton.jit
def _append(survivors, count_ptr, capacity, pattern, taken):
    """Append the taken patterns of a block to a segment's survivors: one relaxed slot
    reservation for all of them, then a scattered store. The count grows by all of them; the
    stores stop at the capacity."""
    ones = taken.to(tl.int32)
    found = tl.sum(ones, 0)
    if found > 0:
        slot = tl.atomic_add(count_ptr, found.to(tl.int64), sem="relaxed")
        place = slot + tl.cumsum(ones, 0) - 1
        tl.store(survivors + place, pattern, mask=taken & (place < capacity))


@triton.jit
def _flush(histograms_ptr, segment, counts, BINS: tl.constexpr):
    bins = tl.arange(0, BINS)
    # Relaxed: the next kernel reads the histogram only after this one has finished.
    tl.atomic_add(histograms_ptr + segment * BINS + bins, counts.to(tl.int64), mask=counts > 0,
                  sem="relaxed")


@triton.jit
def _threshold_histogram_kernel(rows_ptr, chunk_rows_ptr, chunk_starts_ptr, prefix_ptr,
                                histograms_ptr, modes_ptr, survivors_ptr, survivor_counts_ptr,
                                survivor_bases_ptr, survivor_capacities_ptr,
                                DTYPE: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                                BINS: tl.constexpr, APPEND: tl.constexpr,
                                ALIGNED: tl.constexpr, FULL: tl.constexpr,
                                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Count digit (pattern >> SHIFT) % 2**WIDTH of one chunk's patterns whose higher bits
    equal their segment's prefix, into histograms[segment]. With APPEND, a segment marked
    _APPENDING also appends those patterns to its survivors; a segment that reads its
    survivors skips the chunk."""
    chunk = tl.program_id(0)
    row = rows_ptr + tl.load(chunk_rows_ptr + chunk).to(tl.int64) * _COLUMNS
    segment = tl.load(row + _SEGMENT)
    mode = tl.load(modes_ptr + segment)
    if mode <= _APPENDING:
        start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)  # chunks start aligned
        x_ptr = column_pointer(row, _ADDRESS, DTYPE, ALIGNED) + start
        remaining = tl.load(row + _NUMEL) - start
        prefix = tl.load(prefix_ptr + segment)
        if APPEND:
            survivors = survivors_ptr + tl.load(survivor_bases_ptr + segment)
            capacity = tl.load(survivor_capacities_ptr + segment)

        counts = tl.zeros([BINS], dtype=tl.int32)
        for offset in range(0, blocks_end(remaining, FULL, CHUNK), BLOCK):
            index = offset + tl.arange(0, BLOCK)
            inside = lanes(index, remaining, FULL, BLOCK)
            pattern = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0.0))
            candidate, block_counts = _candidate_digits(pattern, inside, prefix, SHIFT, WIDTH,
                                                        BINS)
            counts += block_counts
            if APPEND:
                if mode == _APPENDING:
                    # The bucket fits by the select's count; the bound only guards memory.
                    _append(survivors, survivor_counts_ptr + segment, capacity, pattern,
                            candidate)
        _flush(histograms_ptr, segment, counts, BINS)


@triton.jit
def _survivor_histogram_kernel(chunk_segments_ptr, chunk_starts_ptr, prefix_ptr,
                               histograms_ptr, modes_ptr, survivors_ptr, survivor_counts_ptr,
                               survivor_bases_ptr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                               BINS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The histogram kernel's count over one chunk of a segment's survivor region, for the
    segments that read their survivors; the region is filled up to survivor_counts."""
    chunk = tl.program_id(0)
    segment = tl.load(chunk_segments_ptr + chunk).to(tl.int64)
    if tl.load(modes_ptr + segment) == _FROM_SURVIVORS:
        start = tl.load(chunk_starts_ptr + chunk)
        remaining = tl.load(survivor_counts_ptr + segment) - start
        survivors = survivors_ptr + tl.load(survivor_bases_ptr + segment) + start
        if remaining > 0:  # chunks past the survivors are empty
            prefix = tl.load(prefix_ptr + segment)
            counts = tl.zeros([BINS], dtype=tl.int32)
            for offset in range(0, tl.minimum(remaining, CHUNK), BLOCK):
                index = offset + tl.arange(0, BLOCK)
                inside = index < remaining
                pattern = tl.load(survivors + index, mask=inside, other=0)
                _, block_counts = _candidate_digits(pattern, inside, prefix, SHIFT, WIDTH, BINS)
                counts += block_counts
            _flush(histograms_ptr, segment, counts, BINS)


@triton.jit
def _threshold_select_kernel(histograms_ptr, prefix_ptr, rank_ptr, modes_ptr,
                             survivor_capacities_ptr, WIDTH: tl.constexpr, BINS: tl.constexpr,
                             COMPACT_NEXT: tl.constexpr):
    """For one segment: append the digit that holds the rank-th candidate to the prefix, make
    the rank relative to that digit, and clear the histogram for the next pass. Then advance
    the segment's mode: survivors appended in this pass are read from the next one on; with
    COMPACT_NEXT, a bucket that fits the survivor capacity is appended in the next pass. A
    segment its bracket has answered is left as it is."""
    segment = tl.program_id(0).to(tl.int64)
    mode = tl.load(modes_ptr + segment)
    if mode != _DONE:
        bins = tl.arange(0, BINS)
        counts = tl.load(histograms_ptr + segment * BINS + bins)
        rank = tl.load(rank_ptr + segment)
        digit = tl.sum((tl.cumsum(counts, 0) < rank).to(tl.int32), 0)
        below = tl.sum(tl.where(bins < digit, counts, 0), 0)
        tl.store(rank_ptr + segment, rank - below)
        prefix = tl.load(prefix_ptr + segment)
        tl.store(prefix_ptr + segment, (prefix << WIDTH) | digit)
        tl.store(histograms_ptr + segment * BINS + bins, tl.zeros_like(counts))

        if mode == _APPENDING:
            tl.store(modes_ptr + segment, _FROM_SURVIVORS)
        if COMPACT_NEXT:
            bucket = tl.sum(tl.where(bins == digit, counts, 0), 0)
            fits = bucket <= tl.load(survivor_capacities_ptr + segment)
            if (mode == _FROM_TENSORS) & fits:
                tl.store(modes_ptr + segment, _APPENDING)


@triton.jit
def _sample_kernel(rows_ptr, blocks_ptr, samples_ptr, DTYPE: tl.constexpr,
                   SAMPLE_BLOCK: tl.constexpr):
    """Copy one block of the sample: the keys of a tensor (a row) from its `start` on, at most
    SAMPLE_BLOCK of them, to samples[slot:]. A block row: row, start, length, slot."""
    block = blocks_ptr + tl.program_id(0).to(tl.int64) * 4
    row = rows_ptr + tl.load(block) * _COLUMNS
    x_ptr = column_pointer(row, _ADDRESS, DTYPE, False) + tl.load(block + 1)
    index = tl.arange(0, SAMPLE_BLOCK)
    inside = index < tl.load(block + 2)
    pattern = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0.0))
    tl.store(samples_ptr + tl.load(block + 3) + index, pattern, mask=inside)


@triton.jit
def _bracket_kernel(rows_ptr, chunk_rows_ptr, chunk_starts_ptr, bounds_ptr, counts_ptr,
                    modes_ptr, survivors_ptr, survivor_counts_ptr, survivor_bases_ptr,
                    survivor_capacities_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                    FULL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """For one chunk of a bracketing segment with bracket [lo, hi]: count its keys below lo,
    at lo and at hi (hi != lo) into counts[segment], and append those strictly inside to the
    segment's survivors (survivor_counts counts them all, stored or not)."""
    chunk = tl.program_id(0)
    row = rows_ptr + tl.load(chunk_rows_ptr + chunk).to(tl.int64) * _COLUMNS
    segment = tl.load(row + _SEGMENT)
    if tl.load(modes_ptr + segment) == _BRACKETING:
        start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)
        x_ptr = column_pointer(row, _ADDRESS, DTYPE, ALIGNED) + start
        remaining = tl.load(row + _NUMEL) - start
        lo = tl.load(bounds_ptr + 2 * segment)
        hi = tl.load(bounds_ptr + 2 * segment + 1)
        survivors = survivors_ptr + tl.load(survivor_bases_ptr + segment)
        capacity = tl.load(survivor_capacities_ptr + segment)
        below = tl.zeros([BLOCK], dtype=tl.int32)
        at_lo = tl.zeros([BLOCK], dtype=tl.int32)
        at_hi = tl.zeros([BLOCK], dtype=tl.int32)
        for offset in range(0, blocks_end(remaining, FULL, CHUNK), BLOCK):
            index = offset + tl.arange(0, BLOCK)
            inside = lanes(index, remaining, FULL, BLOCK)
            pattern = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0.0))
            below += (inside & (pattern < lo)).to(tl.int32)
            at_lo += (inside & (pattern == lo)).to(tl.int32)
            at_hi += (inside & (pattern == hi) & (hi != lo)).to(tl.int32)
            _append(survivors, survivor_counts_ptr + segment, capacity, pattern,
                    inside & (pattern > lo) & (pattern < hi))
        # Relaxed: the decision kernel reads the counts only after this one has finished.
        counts = counts_ptr + 3 * segment
        tl.atomic_add(counts, tl.sum(below, 0).to(tl.int64), sem="relaxed")
        tl.atomic_add(counts + 1, tl.sum(at_lo, 0).to(tl.int64), sem="relaxed")
        tl.atomic_add(counts + 2, tl.sum(at_hi, 0).to(tl.int64), sem="relaxed")


@triton.jit
def _bracket_decision_kernel(counts_ptr, bounds_ptr, rank_ptr, modes_ptr, answers_ptr,
                             outcomes_ptr, survivor_counts_ptr, survivor_capacities_ptr):
    """For one bracketing segment, where its counts place the rank-th smallest: at lo or at
    hi (done: the answer and its ties are known), among the survivors (their passes select
    it, the rank made relative to them), or outside the bracket or past the survivors' room
    (the radix passes over the tensors, with no survivors)."""
    segment = tl.program_id(0).to(tl.int64)
    if tl.load(modes_ptr + segment) == _BRACKETING:
        counts = counts_ptr + 3 * segment
        at_lo, at_hi = tl.load(counts + 1), tl.load(counts + 2)
        inside = tl.load(survivor_counts_ptr + segment)
        rank = tl.load(rank_ptr + segment)
        from_lo = rank - tl.load(counts)  # the rank among the keys >= lo
        from_inside = from_lo - at_lo
        from_hi = from_inside - inside
        is_lo = (from_lo >= 1) & (from_lo <= at_lo)
        is_inside = ((from_inside >= 1) & (from_inside <= inside)
                     & (inside <= tl.load(survivor_capacities_ptr + segment)))
        is_hi = (from_hi >= 1) & (from_hi <= at_hi)
        tl.store(rank_ptr + segment,
                 tl.where(is_lo, from_lo,
                          tl.where(is_inside, from_inside, tl.where(is_hi, from_hi, rank))))
        tl.store(answers_ptr + segment,
                 tl.where(is_lo, tl.load(bounds_ptr + 2 * segment),
                          tl.load(bounds_ptr + 2 * segment + 1)))
        tl.store(modes_ptr + segment,
                 tl.where(is_lo | is_hi, _DONE.value,
                          tl.where(is_inside, _FROM_SURVIVORS.value, _FROM_TENSORS.value)))
        tl.store(outcomes_ptr + segment,
                 tl.where(is_lo | is_hi, _AT_BOUND.value,
                          tl.where(is_inside, _INSIDE.value, _MISSED.value)))
        tl.store(survivor_counts_ptr + segment, tl.where(is_inside, inside, 0))


class _Samples(NamedTuple):
    """Where the sample of each bracketed segment comes from and goes."""
    blocks: list[torch.Tensor]  # per dtype group, int64 [blocks, 4]: row, start, length, slot
    segments: torch.Tensor  # the segment of every slot (int64, ascending: regions in order)
    bracketed: torch.Tensor  # per segment, whether it is bracketed (host, bool)
    numels: torch.Tensor  # per segment, its keys (host, int64)
    sizes: torch.Tensor  # per segment, its sample's keys (host, int64)
    bases: torch.Tensor  # per segment, where its sample begins (host, int64)


class _SelectTables(NamedTuple):
    """What radix_select needs besides the ranks, from the tensors and their segments only."""
    groups: list[tables.Group]
    capacities: torch.Tensor  # per segment, how many survivors its region holds
    bases: torch.Tensor  # per segment, where its region begins in the survivor buffer
    survivor_chunks: tuple[torch.Tensor, torch.Tensor]  # segment and start of each chunk
    room: int  # survivors of all segments
    samples: _Samples | None  # None when no segment is bracketed


_TABLES = tables.Cache()


def radix_select(xs, ranks, segments):
    """Per segment, the rank-th smallest |x| of its tensors (ranks[s] >= 1) as an int32 fp32
    pattern, and how many entries equal to it are among the rank smallest (the ties to take).

    `xs` are dense in memory and on one device; `segments[i]` is the segment of xs[i].
    Returns two device tensors of one entry per segment; nothing is synchronised.
    """
    return _radix_select(xs, ranks, segments)[:2]


def _sample_blocks(xs, segments, numels):
    """The sample of every segment of more than radix.BRACKETED_NUMEL keys: per block of
    radix.sample_begins, its tensor (a position in xs), first element there, length (the
    block stops at the tensor's end) and slot; then each segment's sample size."""
    members = [[] for _ in numels]
    for i, segment in enumerate(segments):
        members[segment].append(i)
    blocks, sizes = [], []
    for segment, total in enumerate(numels):
        if total <= radix.BRACKETED_NUMEL:
            sizes.append(0)
            continue
        inside = torch.tensor(members[segment], dtype=torch.int64)
        counts = torch.tensor([xs[i].numel() for i in members[segment]], dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        begins = radix.sample_begins(total)
        which = torch.searchsorted(starts, begins, right=True) - 1
        first = begins - starts[which]
        length = torch.clamp(counts[which] - first, max=radix.SAMPLE_BLOCK)
        blocks.append(torch.stack([inside[which], first, length], 1))
        sizes.append(int(length.sum()))
    blocks = torch.cat(blocks) if blocks else torch.zeros(0, 3, dtype=torch.int64)
    slots = torch.cumsum(blocks[:, 2], 0) - blocks[:, 2]
    return torch.cat([blocks, slots[:, None]], 1), torch.tensor(sizes, dtype=torch.int64)


def _select_tables(device, xs, segments, count):
    """radix_select's tables for these tensors and their segments (`count` of them)."""
    numels = [0] * count
    for x, segment in zip(xs, segments):
        numels[segment] += x.numel()
    capacities = torch.tensor(numels, dtype=torch.int64) // SURVIVOR_SHARE
    bases = torch.cumsum(capacities, 0) - capacities
    # Chunks of every segment's survivor region; how far each is filled is known on the device.
    full_rows, full_starts, tail_rows, tail_starts = tables.chunk_table(capacities.tolist(),
                                                                        CHUNK)
    blocks, sizes = _sample_blocks(xs, segments, numels)
    # Per dtype group, its blocks with the tensor's row in the group's table.
    group_blocks = []
    for indices in tables.dtype_groups(xs).values():
        row_in_group = torch.full((len(xs),), -1, dtype=torch.int64)
        row_in_group[indices] = torch.arange(len(indices))
        rows = row_in_group[blocks[:, 0]]
        group_blocks.append(torch.cat([rows[rows >= 0, None], blocks[rows >= 0, 1:]], 1))
    slot_segments = torch.repeat_interleave(sizes)
    groups, extra = tables.grouped(
        device, xs, lambda i: [xs[i].data_ptr(), xs[i].numel(), segments[i]], 1, CHUNK,
        capacities, bases, torch.cat([full_rows, tail_rows]), torch.cat([full_starts, tail_starts]),
        slot_segments, *group_blocks)
    capacities, bases, chunk_segments, chunk_starts, slot_segments = extra[:5]
    samples = None
    if slot_segments.numel():
        samples = _Samples(extra[5:], slot_segments, sizes > 0,
                           torch.tensor(numels, dtype=torch.int64), sizes,
                           torch.cumsum(sizes, 0) - sizes)
    return _SelectTables(groups, capacities, bases, (chunk_segments, chunk_starts),
                         sum(n // SURVIVOR_SHARE for n in numels), samples)


def _radix_select(xs, ranks, segments):
    """radix_select, also returning the segments' final modes, survivor counts and bracket
    outcomes."""
    device = xs[0].device
    passes = max(PASSES[x.dtype] for x in xs)
    found = _cached_tables(device, xs, segments, len(ranks))
    survivor_chunk_segments, survivor_chunk_starts = found.survivor_chunks
    ranks = torch.tensor(ranks, dtype=torch.int64)
    samples = found.samples
    if samples is None:
        (rank,) = tables.upload(device, ranks)
        modes = torch.zeros(len(ranks), dtype=torch.int32, device=device)
    else:
        lo, hi = radix.bracket_ranks(ranks, samples.numels.clamp(min=1), samples.sizes,
                                     BRACKET_SCALE)
        # Indices in the sorted samples; -1 for an open side (and where there is no sample).
        lo = torch.where(samples.bracketed & (lo >= 0), samples.bases + lo, -1)
        hi = torch.where(samples.bracketed & (hi < samples.sizes), samples.bases + hi, -1)
        initial = torch.where(samples.bracketed, _BRACKETING.value, _FROM_TENSORS.value)
        rank, lo, hi, modes = tables.upload(device, ranks, lo, hi, initial.to(torch.int32))
    prefix = torch.zeros(len(ranks), dtype=torch.int32, device=device)
    histograms = torch.zeros(len(ranks), BINS, dtype=torch.int64, device=device)
    survivor_counts = torch.zeros(len(ranks), dtype=torch.int64, device=device)
    outcomes = torch.zeros(len(ranks), dtype=torch.int32, device=device)
    answers = torch.zeros(len(ranks), dtype=torch.int32, device=device)
    # Survivors are appended in a pass p with 1 <= p <= passes - 2 (0-based): after pass 0 a
    # bucket size is known, and a later pass must remain to read them; or by the bracket.
    compacts = passes >= 3 or samples is not None
    survivors = torch.empty(max(found.room if compacts else 0, 1), dtype=torch.int32,
                            device=device)
    with tables.on_device(device):
        if samples is not None:
            _bracket(found, lo, hi, rank, modes, answers, outcomes, survivors, survivor_counts)
        for p, (shift, width) in enumerate(DIGITS[:passes]):
            _histograms(found, prefix, histograms, modes, survivors, survivor_counts, shift,
                        width, append=1 <= p <= passes - 2)
            if (p >= 2 or samples is not None) and survivor_chunk_segments.numel():
                _survivor_histogram_kernel[(survivor_chunk_segments.numel(),)](
                    survivor_chunk_segments, survivor_chunk_starts, prefix, histograms, modes,
                    survivors, survivor_counts, found.bases, SHIFT=shift, WIDTH=width,
                    BINS=BINS, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
                    enable_fp_fusion=False)
            _threshold_select_kernel[(len(ranks),)](histograms, prefix, rank, modes,
                                                    found.capacities, WIDTH=width, BINS=BINS,
                                                    COMPACT_NEXT=1 <= p + 1 <= passes - 2,
                                                    enable_fp_fusion=False)
    pattern = torch.where(modes == _DONE.value, answers, prefix << DIGITS[passes - 1][0])
    return pattern, rank, modes, survivor_counts, outcomes


def _bracket(found, lo, hi, rank, modes, answers, outcomes, survivors, survivor_counts):
    """The bracketed segments' sample, brackets and counting pass, and the decision of where
    each one's k-th smallest is (launched on the current device)."""
    samples = found.samples
    keys = torch.empty(samples.segments.numel(), dtype=torch.int32, device=survivors.device)
    for group, blocks in zip(found.groups, samples.blocks):
        if blocks.numel():
            _sample_kernel[(blocks.shape[0],)](group.rows, blocks, keys, DTYPE=group.dtype,
                                               SAMPLE_BLOCK=radix.SAMPLE_BLOCK,
                                               enable_fp_fusion=False)
    # One sort for every segment: each region stays in place, sorted within.
    ordered = ((samples.segments << 31) | keys.long()).sort().values & 0x7FFFFFFF
    bounds = torch.stack([torch.where(lo >= 0, ordered[lo.clamp(min=0)], 0),
                          torch.where(hi >= 0, ordered[hi.clamp(min=0)], 0x7FFFFFFF)],
                         1).to(torch.int32)
    counts = torch.zeros(rank.numel(), 3, dtype=torch.int64, device=rank.device)
    for group in found.groups:
        for full, chunk_rows, chunk_starts in group.launches():
            _bracket_kernel[(chunk_rows.numel(),)](
                group.rows, chunk_rows, chunk_starts, bounds, counts, modes, survivors,
                survivor_counts, found.bases, found.capacities, DTYPE=group.dtype,
                ALIGNED=group.aligned, FULL=full, CHUNK=CHUNK, BLOCK=BLOCK,
                num_warps=NUM_WARPS, enable_fp_fusion=False)
    _bracket_decision_kernel[(rank.numel(),)](counts, bounds, rank, modes, answers, outcomes,
                                              survivor_counts, found.capacities,
                                              enable_fp_fusion=False)


def _histograms(found, prefix, histograms, modes, survivors, survivor_counts, shift, width,
                append):
    """One pass's histogram launches over every tensor of the tables (one per dtype group)."""
    for group in found.groups:
        for full, chunk_rows, chunk_starts in group.launches():
            _threshold_histogram_kernel[(chunk_rows.numel(),)](
                group.rows, chunk_rows, chunk_starts, prefix, histograms, modes, survivors,
                survivor_counts, found.bases, found.capacities, DTYPE=group.dtype, SHIFT=shift,
                WIDTH=width, BINS=BINS, APPEND=append, ALIGNED=group.aligned, FULL=full,
                CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _cached_tables(device, xs, segments, count):
    key = (device, tables.current_stream(device), tuple(map(torch.Tensor.data_ptr, xs)),
           tuple(x.numel() for x in xs), tuple(x.dtype for x in xs), tuple(segments), count)
    found = _TABLES.get(key)
    return found if found is not None else _TABLES.add(
        key, _select_tables(device, xs, segments, count))


def magnitude_histogram(xs, rows, prefixes, shift, bits):
    """The op on the radix select's histogram kernel: every tensor in one launch per dtype."""
    device = prefixes.device
    histograms = torch.zeros(prefixes.numel(), BINS, dtype=torch.int64, device=device)
    kept = [(x, row) for x, row in zip(dense(xs), rows) if x.numel()]
    if kept:
        xs, rows = (list(column) for column in zip(*kept))
        found = _cached_tables(device, xs, rows, prefixes.numel())
        modes = torch.zeros(prefixes.numel(), dtype=torch.int32, device=device)
        unused = torch.zeros(1, dtype=torch.int32, device=device)
        with tables.on_device(device):
            _histograms(found, prefixes.to(torch.int32), histograms, modes, unused,
                        unused.long(), shift, bits, append=False)
    return histograms[:, :1 << bits].contiguous()


def dense(xs):
    """The tensors as dense memory blocks: copies only those that are not."""
    return [x if tables.dense_in_memory(x) else x.contiguous() for x in xs]


def kth_smallest_abs(xs, k):
    pattern, _ = radix_select(dense(xs), [k], [0] * len(xs))
    return pattern.view(torch.float32).reshape(()).to(magnitude_dtype(xs))


def kth_smallest_abs_per_tensor(xs, ks):
    """One segment per tensor: every threshold in the same launches."""
    pattern, _ = radix_select(dense(xs), list(ks), list(range(len(xs))))
    return pattern.view(torch.float32).to(magnitude_dtype(xs))
