"""Exact thresholds and masks over tensors sharded across ranks, without gathering them.

Each rank passes its local shard of every tensor (the same list of tensors on every rank,
shards possibly empty). The gathered tensor is taken to be the concatenation of the shards in
rank order, as FSDP's dim-0 sharding and flat-parameter sharding both lay it out, so the
global position of an entry is (tensor, rank, local flat index); the masks equal the ones a
single process computes on the gathered tensors, ties included.

Radix select over the 31 magnitude bits of fp32 |x| (fp16/bf16 upcast exactly): passes of
11, 10 and 10 bits; each rank histograms its candidates locally and one all_reduce per pass
sums the histograms (one row per tensor for scope="layer", one row for "global"). Bytes sent
per rank: 16*T (sizes and NaN flags), 8*R*(2048 + 1024 + 1024) for the three histograms with
R rows, and for masks 8*T*world (the tie counts, all_gathered) — independent of model size.
"""

import functools

import torch
import torch.distributed as dist

from . import _checks, _ops

_PASS_BITS = (11, 10, 10)  # high to low; 31 bits in all: the sign bit of |x| is always 0


@functools.cache
def _dtensor_class():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensor(t):
    """The local shard of a DTensor (a view: writes reach the DTensor); other tensors as is."""
    dtensor = _dtensor_class()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def unshard(xs):
    """FSDP2 parameters (DTensors sharded on dim 0 of a 1-D mesh) -> (their local shards, the
    mesh's process group); anything else -> (xs, None)."""
    dtensor = _dtensor_class()
    items = [xs] if isinstance(xs, torch.Tensor) else xs
    if dtensor is None or not isinstance(items, (list, tuple)) or not any(
            isinstance(x, dtensor) for x in items):
        return xs, None
    from torch.distributed.tensor import Shard

    mesh = next(x for x in items if isinstance(x, dtensor)).device_mesh
    for i, x in enumerate(items):
        if not isinstance(x, dtensor) or x.device_mesh != mesh:
            raise ValueError(f"xs[{i}] is not a DTensor on the same device mesh as the others; "
                             "pass all shards of one mesh, or plain tensors")
        if mesh.ndim != 1 or tuple(x.placements) != (Shard(0),):
            raise ValueError(f"xs[{i}] has placements {tuple(x.placements)} on a {mesh.ndim}-D "
                             "mesh; only dim-0 sharding on a 1-D mesh (FSDP2) is supported")
    local = [x.to_local() for x in items]
    return (local[0] if isinstance(xs, torch.Tensor) else local), mesh.get_group()


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The fp32 bit pattern of |x|, flat, as int64 (ordered like the magnitudes)."""
    return x.detach().reshape(-1).float().abs().view(torch.int32).long()


def _validated(xs, process_group, names):
    """Shards checked on every rank; a problem on any rank raises on all of them."""
    xs, label = _checks.weights(xs, names)
    device = xs[0].device
    local = torch.cat([torch.tensor([x.numel() for x in xs], dtype=torch.int64, device=device),
                       _checks.non_finite(xs).long()])
    dist.all_reduce(local, group=process_group)
    numels, bad = local[: len(xs)].tolist(), local[len(xs):].tolist()
    for i, flag in enumerate(bad):
        if flag:
            raise ValueError(f"{label(i)} contains NaN or Inf on {flag} rank(s); magnitudes "
                             "are undefined")
    return xs, numels


def _select(bits, rows, ks, process_group):
    """Per row, the magnitude bits of the k-th smallest entry, and its rank among the entries
    equal to it (the ties to prune). `rows[r]` lists the indices of the tensors in row r."""
    device = bits[0].device
    prefix = torch.zeros(len(rows), dtype=torch.int64, device=device)
    remaining = torch.tensor(ks, dtype=torch.int64, device=device)
    done_bits = 0
    for width in _PASS_BITS:
        shift = 31 - done_bits - width
        hist = torch.zeros(len(rows), 1 << width, dtype=torch.int64, device=device)
        for r, members in enumerate(rows):
            for i in members:
                b = bits[i]
                candidates = b[(b >> (shift + width)) == prefix[r]]
                hist[r] += torch.bincount((candidates >> shift) & ((1 << width) - 1),
                                          minlength=1 << width)
        dist.all_reduce(hist, group=process_group)
        cumulative = hist.cumsum(1)
        bucket = torch.searchsorted(cumulative, remaining.unsqueeze(1)).squeeze(1)
        below = torch.where(bucket > 0,
                            cumulative.gather(1, (bucket - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                            0)
        remaining = remaining - below
        prefix = (prefix << width) | bucket
        done_bits += width
    return prefix, remaining


def kth_smallest_abs(xs, k: int, process_group, *, names=None) -> torch.Tensor:
    """The exact k-th smallest |x| over the gathered tensors (1 <= k <= total numel)."""
    xs, numels = _validated(xs, process_group, names)
    k = _checks.integer(k, "k")
    if not 1 <= k <= sum(numels):
        raise ValueError(f"k must be in [1, {sum(numels)}] (the number of elements), got {k}")
    bits = [_magnitude_bits(x) for x in xs]
    value_bits, _ = _select(bits, [list(range(len(xs)))], [k], process_group)
    value = value_bits.to(torch.int32).view(torch.float32)[0]
    return value.to(_ops.magnitude_dtype(xs))


def magnitude_masks(xs, sparsity: float, scope: str, process_group, *, names=None) -> list:
    """Local shards of the masks a single process computes on the gathered tensors."""
    xs, numels = _validated(xs, process_group, names)
    sparsity = _checks.sparsity(sparsity)
    scope = _checks.scope(scope)
    if scope == "layer":
        rows = [[i] for i in range(len(xs))]
        ks = [_ops.pruned_count(sparsity, n) for n in numels]
    else:
        rows = [list(range(len(xs)))]
        ks = [_ops.pruned_count(sparsity, sum(numels))]
    bits = [_magnitude_bits(x) for x in xs]
    # Rows that prune nothing still take part in the collectives (with k = 1) and keep all.
    value_bits, ties_to_prune = _select(bits, rows, [max(k, 1) for k in ks], process_group)

    row_of = {i: r for r, members in enumerate(rows) for i in members}
    tied = [b == value_bits[row_of[i]] for i, b in enumerate(bits)]
    counts = torch.stack([t.sum() for t in tied])
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=process_group)
    ties = torch.stack(gathered)  # [rank, tensor]
    me = dist.get_rank(process_group)

    masks = []
    for i, (x, b, t) in enumerate(zip(xs, bits, tied)):
        r = row_of[i]
        if ks[r] == 0:
            masks.append(torch.ones(x.shape, dtype=torch.bool, device=x.device))
            continue
        # Ties in earlier positions: earlier tensors of the row (all ranks), then earlier ranks.
        earlier = [j for j in rows[r] if j < i]
        offset = ties[:, earlier].sum() + ties[:me, i].sum()
        pruned = (b < value_bits[r]) | (t & (torch.cumsum(t, 0) + offset <= ties_to_prune[r]))
        masks.append((~pruned).reshape(x.shape))
    return masks
