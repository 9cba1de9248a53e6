"""N:M masks: in every group of m consecutive entries along dim 1, the n largest |x| are kept,
the lower index pruned first among equal magnitudes (docs/design.md, N:M masks).

A tensor, read row-major, is (A, C, B): A the size of dim 0, C of dim 1, B the product of the
rest. Its groups are numbered g = r * B + b, r a row (a, c // m) of m * B entries, and entry j
of group g lies at r * m * B + j * B + b. A program ranks a block of groups at once: each
entry's key (the fp32 bit pattern of |x|) is compared with the m keys of its group, and it is
kept when fewer than n of them rank above it. One launch per dtype covers every tensor.
"""

import torch
import triton
import triton.language as tl

from . import tables
from .tables import blocks_end, column_pointer, lanes
from .threshold import magnitude_pattern

NUM_WARPS = 4
BLOCKS_PER_PROGRAM = 16
PAIRS = 8192  # comparisons of one block: groups x M_P2 x M_P2

# Columns of the per-tensor row table (int64); the masks' addresses have a table of their own.
_ADDRESS = tl.constexpr(0)
_NUMEL = tl.constexpr(1)
_INNER = tl.constexpr(2)  # B: the product of the sizes after dim 1
_COLUMNS = tl.constexpr(3)


@triton.jit
def _nm_kernel(rows_ptr, masks_ptr, nan_ptr, chunk_rows_ptr, chunk_starts_ptr, N: tl.constexpr,
               M: tl.constexpr, M_P2: tl.constexpr, DTYPE: tl.constexpr, FULL: tl.constexpr,
               CHUNK: tl.constexpr, GROUPS: tl.constexpr):
    """The masks of the CHUNK // M groups that start at element `start` of one tensor; a NaN
    among them (its key is above Inf's) sets the tensor's flag at nan_ptr."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_rows_ptr + chunk).to(tl.int64)
    row = rows_ptr + tensor * _COLUMNS
    x_ptr = column_pointer(row, _ADDRESS, DTYPE, False)
    mask_ptr = column_pointer(masks_ptr + tensor, 0, tl.int8, False)
    inner = tl.load(row + _INNER)
    start = tl.load(chunk_starts_ptr + chunk)  # a multiple of CHUNK, so of M
    first_group = start // M
    remaining = (tl.load(row + _NUMEL) - start) // M  # groups from the first
    j = tl.arange(0, M_P2)
    position = j[None, :]
    later = j[None, None, :] > j[None, :, None]  # [1, i, j]: j after i
    member = j[None, None, :] < M
    for offset in range(0, blocks_end(remaining, FULL, CHUNK // M), GROUPS):
        local = offset + tl.arange(0, GROUPS)
        g = first_group + local
        r = g // inner
        index = r[:, None] * (M * inner) + position * inner + (g - r * inner)[:, None]
        inside = lanes(local, remaining, FULL, GROUPS)[:, None] & (position < M)
        key = magnitude_pattern(tl.load(x_ptr + index, mask=inside, other=0))
        mine = key[:, :, None]
        other = key[:, None, :]
        above = ((other > mine) | ((other == mine) & later)) & member
        count = tl.sum(above.to(tl.int32), axis=2)
        tl.store(mask_ptr + index, (count < N).to(tl.int8), mask=inside)
        if tl.max(tl.max(key, 1), 0) > 0x7F800000:
            tl.store(nan_ptr + tensor, 1)


_TABLES = tables.Cache()


def _block(m: int) -> tuple[int, int, int]:
    """(M_P2, groups per block, elements per program) for groups of m."""
    m_p2 = triton.next_power_of_2(m)
    groups = max(2, PAIRS // (m_p2 * m_p2))
    return m_p2, groups, groups * m * BLOCKS_PER_PROGRAM


def nm_masks(xs, n, m):
    device = xs[0].device
    xs_logical = [x.contiguous() for x in xs]  # groups are found by logical (row-major) index
    masks = [torch.empty(x.shape, dtype=torch.bool, device=device) for x in xs]
    work = [i for i, x in enumerate(xs_logical) if x.numel()]
    if not work:
        return masks
    xs_work = [xs_logical[i] for i in work]
    inners = [x.numel() // (x.shape[0] * x.shape[1]) for x in xs_work]
    m_p2, groups_per_block, chunk = _block(m)
    groups = tables.cached_groups(_TABLES, device, xs_work, chunk, inners, key=(m,))
    mask_tables, _, _ = tables.address_tables(
        device, groups, tuple(masks[i].data_ptr() for i in work))
    nan_flags = [torch.zeros(len(group.indices), dtype=torch.int32, device=device)
                 for group in groups]
    with tables.on_device(device):
        for group, masks_table, flags in zip(groups, mask_tables, nan_flags):
            for full, chunk_rows, chunk_starts in group.launches():
                _nm_kernel[(chunk_rows.numel(),)](
                    group.rows, masks_table, flags, chunk_rows, chunk_starts, N=n, M=m,
                    M_P2=m_p2, DTYPE=group.dtype, FULL=full, CHUNK=chunk,
                    GROUPS=groups_per_block, num_warps=NUM_WARPS)
    # One device sync per call: the op raises on a NaN, as the other backends do.
    flagged = torch.cat(nan_flags).nonzero()
    if flagged.numel():
        positions = [i for group in groups for i in group.indices]
        raise ValueError(f"xs[{work[positions[int(flagged[0])]]}] contains NaN; magnitudes are "
                         "undefined")
    return masks
