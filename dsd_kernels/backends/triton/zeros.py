"""Masks of the entries that are not zero (+0.0 and -0.0 both pruned), in one pass that also
finds a NaN: the masks of a model that is already sparse.

An entry's key is the fp32 bit pattern of |x| (`threshold.magnitude_pattern`): 0 exactly for
the two zeros, above Inf's exactly for a NaN. One launch per dtype covers every tensor; a
NaN sets its tensor's flag, read once after the launches.
"""

import torch
import triton
import triton.language as tl

from ..._ops import NAN_IS_NO_WEIGHT
from . import tables
from .tables import blocks_end, column_pointer, lanes
from .threshold import magnitude_pattern

BLOCK = 2048  # elements per step of a program
CHUNK = 16 * BLOCK  # elements per program
NUM_WARPS = 8
_FP32_INF_PATTERN = tl.constexpr(0x7F800000)

# Columns of the per-tensor row table (int64); the masks' addresses have a table of their own.
_ADDRESS = tl.constexpr(0)
_NUMEL = tl.constexpr(1)
_COLUMNS = tl.constexpr(2)


@triton.jit
def _nonzero_kernel(rows_ptr, masks_ptr, nan_ptr, chunk_rows_ptr, chunk_starts_ptr,
                    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk's mask: x != 0; a NaN in the chunk sets the tensor's flag at nan_ptr."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_rows_ptr + chunk).to(tl.int64)
    row = rows_ptr + tensor * _COLUMNS
    start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)  # chunks start aligned
    x_ptr = column_pointer(row, _ADDRESS, DTYPE, ALIGNED) + start
    mask_ptr = column_pointer(masks_ptr + tensor, 0, tl.int8, ALIGNED) + start
    remaining = tl.load(row + _NUMEL) - start
    largest = tl.zeros([], dtype=tl.int32)
    for offset in range(0, blocks_end(remaining, FULL, CHUNK), BLOCK):
        index = offset + tl.arange(0, BLOCK)
        inside = lanes(index, remaining, FULL, BLOCK)
        key = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0.0))
        tl.store(mask_ptr + index, (key != 0).to(tl.int8), mask=inside)
        largest = tl.maximum(largest, tl.max(key, 0))
    if largest > _FP32_INF_PATTERN:
        tl.store(nan_ptr + tensor, 1)


_TABLES = tables.Cache()


def nonzero_masks(xs):
    device = xs[0].device
    xs_logical = [x.contiguous() for x in xs]  # masks are contiguous: read x in the same order
    masks = [torch.empty(x.shape, dtype=torch.bool, device=device) for x in xs]
    work = [i for i, x in enumerate(xs_logical) if x.numel()]
    if not work:
        return masks
    xs_work = [xs_logical[i] for i in work]
    groups = tables.cached_groups(_TABLES, device, xs_work, CHUNK)
    mask_tables, masks_aligned, _ = tables.address_tables(
        device, groups, tuple(masks[i].data_ptr() for i in work))
    nan_flags = [torch.zeros(len(group.indices), dtype=torch.int32, device=device)
                 for group in groups]
    with tables.on_device(device):
        for group, masks_table, aligned, flags in zip(groups, mask_tables, masks_aligned,
                                                      nan_flags):
            for full, chunk_rows, chunk_starts in group.launches():
                _nonzero_kernel[(chunk_rows.numel(),)](
                    group.rows, masks_table, flags, chunk_rows, chunk_starts, DTYPE=group.dtype,
                    ALIGNED=aligned and group.aligned, FULL=full, CHUNK=CHUNK, BLOCK=BLOCK,
                    num_warps=NUM_WARPS)
    # One device sync per call: the op raises on a NaN, as the other backends do.
    flagged = torch.cat(nan_flags).nonzero()
    if flagged.numel():
        positions = [i for group in groups for i in group.indices]
        raise ValueError(f"xs[{work[positions[int(flagged[0])]]}] contains NaN; "
                         f"{NAN_IS_NO_WEIGHT}")
    return masks
