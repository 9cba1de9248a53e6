"""Magnitude masks with the exact tie rule, and in-place mask application: pruned entries
set to +0.0 (apply_masks_) or to a value per tensor (fill_pruned_).

A segment (one tensor for scope="layer", all of them for "global") prunes its k smallest |x|:
every entry below the threshold t (its k-th smallest |x|, from `threshold.radix_select`) and
the first r entries equal to t in position order (lower flat index, then earlier tensor),
r = k - count(|x| < t). To give each tie its rank in that order, the chunks of all tensors
are numbered in position order: one pass counts the ties per chunk, an exclusive scan over
the chunks of each segment gives the ties before a chunk, and the writing pass adds the rank
within the chunk (a block cumsum). Masks are bool, contiguous, True = kept.

Tables of the tensors are cached (tables.Cache); the masks' addresses (new masks with every
call) and the pruned counts of a call travel in tables of their own.
"""

import math

import torch
import triton
import triton.language as tl

from . import tables
from .tables import blocks_end, column_pointer, lanes
from .threshold import magnitude_pattern, radix_select

BLOCK = 2048  # elements per step of a program
CHUNK = 16 * BLOCK  # elements per program; the unit the tie ranks are scanned over
NUM_WARPS = 8

# Columns of the per-tensor row table of the mask kernel (int64); the fill kernel's rows are
# the first two. The masks' addresses are in a table of their own.
_ADDRESS = tl.constexpr(0)
_NUMEL = tl.constexpr(1)
_SEGMENT = tl.constexpr(2)
_FIRST_CHUNK = tl.constexpr(3)  # position-order number of the tensor's first chunk
_COLUMNS = tl.constexpr(4)


@triton.jit
def _pointers(row, mask_address, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
              MASK_BYTES: tl.constexpr):
    """The chunk's typed pointers into x and into its mask (bool, read as int8; its address
    at `mask_address`); with ALIGNED, x's is promised 16-byte alignment and the mask's
    MASK_BYTES (a kernel whose mask layout must follow fp32 data, 4 per thread, promises 4)."""
    x_ptr = column_pointer(row, _ADDRESS, DTYPE, ALIGNED)
    mask_ptr = column_pointer(mask_address, 0, tl.int8, ALIGNED, MASK_BYTES)
    return x_ptr + start, mask_ptr + start


@triton.jit
def _mask_kernel(rows_ptr, masks_ptr, chunk_rows_ptr, chunk_starts_ptr, pruned_ptr,
                 thresholds_ptr, ties_to_prune_ptr, tie_counts_ptr, ties_before_ptr,
                 DTYPE: tl.constexpr, WRITE: tl.constexpr, ALIGNED: tl.constexpr,
                 FULL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """WRITE=False: count one chunk's entries equal to its segment's threshold.
    WRITE=True: write the chunk's mask, ranking its ties after the segment's earlier ones."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_rows_ptr + chunk).to(tl.int64)
    row = rows_ptr + tensor * _COLUMNS
    start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)  # chunks start aligned
    x_ptr, mask_ptr = _pointers(row, masks_ptr + tensor, start, DTYPE, ALIGNED, 16)
    remaining = tl.load(row + _NUMEL) - start
    segment = tl.load(row + _SEGMENT)
    chunk_id = tl.load(row + _FIRST_CHUNK) + start // CHUNK
    # Patterns are >= 0: a threshold of -1 makes a segment with k = 0 keep everything.
    threshold = tl.where(tl.load(pruned_ptr + segment) != 0, tl.load(thresholds_ptr + segment),
                         -1)
    if WRITE:
        ties_to_prune = tl.load(ties_to_prune_ptr + segment)
        ties_seen = tl.load(ties_before_ptr + chunk_id)
    else:
        ties_seen = tl.zeros([], dtype=tl.int64)

    for offset in range(0, blocks_end(remaining, FULL, CHUNK), BLOCK):
        index = offset + tl.arange(0, BLOCK)
        inside = lanes(index, remaining, FULL, BLOCK)
        pattern = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0.0))
        tie = inside & (pattern == threshold)
        if WRITE:
            rank = ties_seen + tl.cumsum(tie.to(tl.int32), 0)  # 1-based among the segment's ties
            pruned = (pattern < threshold) | (tie & (rank <= ties_to_prune))
            tl.store(mask_ptr + index, (~pruned).to(tl.int8), mask=inside)
        ties_seen += tl.sum(tie.to(tl.int32), 0)
    if not WRITE:
        tl.store(tie_counts_ptr + chunk_id, ties_seen)


_TABLES = tables.Cache()


def magnitude_masks(xs, ks, scope):
    device = xs[0].device
    # Ties are ranked by logical flat index, which is memory order only when contiguous.
    xs_logical = [x.contiguous() for x in xs]
    masks = [torch.empty(x.shape, dtype=torch.bool, device=device) for x in xs]
    prune = list(ks)
    segments = list(range(len(xs))) if scope == "layer" else [0] * len(xs)
    if not any(prune):
        return [mask.fill_(True) for mask in masks]
    thresholds, ties_to_prune = radix_select(xs_logical, [max(k, 1) for k in prune], segments)

    key = (device, tables.current_stream(device), tuple(map(torch.Tensor.data_ptr, xs_logical)),
           tuple(x.numel() for x in xs), tuple(x.dtype for x in xs), scope)
    found = _TABLES.get(key)
    if found is None:
        found = _TABLES.add(key, _mask_tables(device, xs_logical, segments, scope))
    groups, segment_first_chunk, chunks = found
    mask_tables, masks_aligned, (pruned,) = tables.address_tables(
        device, groups, tuple(map(torch.Tensor.data_ptr, masks)),
        torch.tensor(prune, dtype=torch.int64))
    tie_counts = torch.empty(chunks, dtype=torch.int64, device=device)

    def launch(write, ties_before):
        for group, masks_table, aligned in zip(groups, mask_tables, masks_aligned):
            for full, chunk_rows, chunk_starts in group.launches():
                _mask_kernel[(chunk_rows.numel(),)](
                    group.rows, masks_table, chunk_rows, chunk_starts, pruned, thresholds,
                    ties_to_prune, tie_counts, ties_before, DTYPE=group.dtype, WRITE=write,
                    ALIGNED=aligned and group.aligned, FULL=full, CHUNK=CHUNK, BLOCK=BLOCK,
                    num_warps=NUM_WARPS, enable_fp_fusion=False)

    with tables.on_device(device):
        launch(False, tie_counts)
        ties_before_in_list = torch.cumsum(tie_counts, 0) - tie_counts
        launch(True, ties_before_in_list - ties_before_in_list[segment_first_chunk])
    return masks


def _mask_tables(device, xs, segments, scope):
    """The mask kernel's groups, each chunk's first chunk of its segment, the chunk count."""
    chunks = torch.tensor([math.ceil(x.numel() / CHUNK) for x in xs], dtype=torch.int64)
    first_chunk = torch.cumsum(chunks, 0) - chunks  # chunks are numbered in position order
    # For the scan: the number of the first chunk of each chunk's segment.
    segment_starts = first_chunk if scope == "layer" else torch.zeros_like(first_chunk)
    segment_first_chunk = segment_starts.repeat_interleave(chunks)
    first_chunk = first_chunk.tolist()
    groups, (segment_first_chunk,) = tables.grouped(
        device, xs, lambda i: [xs[i].data_ptr(), xs[i].numel(), segments[i], first_chunk[i]],
        1, CHUNK, segment_first_chunk)
    return groups, segment_first_chunk, int(chunks.sum())


_FILL_COLUMNS = tl.constexpr(2)  # address, element count
_FILL_TABLES = tables.Cache()


@triton.jit
def _fill_pruned_kernel(rows_ptr, masks_ptr, values_ptr, chunk_rows_ptr, chunk_starts_ptr,
                        DTYPE: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """x = the tensor's value where the mask is False: reads only the mask and the value
    (already rounded to DTYPE on the host), writes only pruned entries."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_rows_ptr + chunk).to(tl.int64)
    row = rows_ptr + tensor * _FILL_COLUMNS
    start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)  # chunks start aligned
    x_ptr, mask_ptr = _pointers(row, masks_ptr + tensor, start, DTYPE, ALIGNED,
                                4)  # scalar stores: no vectors
    value = tl.broadcast_to(tl.load(values_ptr + tensor), [BLOCK])  # no arithmetic: -0.0 stays
    remaining = tl.load(row + _NUMEL) - start
    for offset in range(0, blocks_end(remaining, FULL, CHUNK), BLOCK):
        index = offset + tl.arange(0, BLOCK)
        inside = lanes(index, remaining, FULL, BLOCK)
        keep = tl.load(mask_ptr + index, mask=inside, other=1)
        tl.store(x_ptr + index, value, mask=inside & (keep == 0))


def fill_pruned_(xs, masks, values):
    device = xs[0].device
    staging = tables.Staging()
    targets = [staging.dense(x, written=True) for x in xs]
    masks = [staging.like(mask, x, written=False) for mask, x in zip(masks, targets)]
    groups = tables.cached_groups(_FILL_TABLES, device, targets, CHUNK)
    # Each group's values in its dtype, converted one by one as torch's fill converts them
    # (through fp32; a NaN becomes the dtype's default NaN), not by a vectorized cast.
    value_tables = [torch.tensor([values[i] for i in group.indices],
                                 dtype=targets[group.indices[0]].dtype) for group in groups]
    mask_tables, masks_aligned, value_tables = tables.address_tables(
        device, groups, tuple(map(torch.Tensor.data_ptr, masks)), *value_tables)
    with tables.on_device(device):
        for group, masks_table, aligned, values_table in zip(groups, mask_tables, masks_aligned,
                                                             value_tables):
            for full, chunk_rows, chunk_starts in group.launches():
                _fill_pruned_kernel[(chunk_rows.numel(),)](
                    group.rows, masks_table, values_table, chunk_rows, chunk_starts,
                    DTYPE=group.dtype, ALIGNED=aligned and group.aligned, FULL=full,
                    CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    staging.finish()


def apply_masks_(xs, masks):
    fill_pruned_(xs, masks, [0.0] * len(xs))
