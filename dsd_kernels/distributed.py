"""Exact thresholds and masks over tensors sharded across ranks, without gathering them.

Each rank passes its local shard of every tensor (the same list of tensors on every rank,
shards possibly empty). The gathered tensor is taken to be the concatenation of the shards in
rank order, as FSDP's dim-0 sharding and flat-parameter sharding both lay it out, so the
global position of an entry is (tensor, rank, local flat index); the masks equal the ones a
single process computes on the gathered tensors, ties included.

The radix select of `radix.select` on the selected backend's `magnitude_histogram` kernel:
each pass histograms one digit of every local shard in one op call, and one all_reduce sums
the histograms of all tensors (one row per tensor for scope="layer", one row for "global").
Nothing is copied per element but bounded chunks while the masks are written. Collectives per
call: one all_reduce of sizes and NaN flags, one per pass (4 for fp32, 3 for fp16, 2 for bf16),
and for masks one all_gather of the tie counts. Bytes sent per rank: 16*T, then 8*R*(128 + 256
+ 256 + 256) for the fp32 passes with R rows, and 8*T*world for the tie counts: independent of
the model's size.
"""

import functools

import torch
import torch.distributed as dist

from . import _checks, _ops, radix
from .backends import ensure_selected

# Elements compared at once while writing masks: bounds the temporaries (about 13 bytes per
# element of the chunk) whatever the shard's size.
MASK_CHUNK = 1 << 18


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


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter, its state)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def like_dtensor(local, dtensor):
    """`local` (this rank's shard, shaped like `dtensor`'s) as a DTensor laid out like
    `dtensor`: the same mesh, placements and global shape."""
    return _dtensor_class().from_local(local, dtensor.device_mesh, dtensor.placements,
                                       run_check=False, shape=dtensor.shape,
                                       stride=dtensor.stride())


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


def _select(xs, rows, ks, process_group):
    """radix.select over the shards, the histograms summed over the ranks at every pass."""
    ensure_selected()
    return radix.select(xs, rows, torch.tensor(ks, dtype=torch.int64, device=xs[0].device),
                        lambda hist: dist.all_reduce(hist, group=process_group))


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """The magnitude keys (fp32 bit patterns of |x|) of a flat chunk, as int32."""
    return chunk.float().view(torch.int32) & 0x7FFFFFFF


def _chunks(x: torch.Tensor):
    flat = x.detach().reshape(-1)
    for start in range(0, flat.numel(), MASK_CHUNK):
        yield start, flat[start:start + MASK_CHUNK]


def kth_smallest_abs(xs, k, process_group, *, names=None) -> torch.Tensor:
    """The exact k-th smallest |x| over the gathered tensors (1 <= k <= total numel); with k a
    list of one int per tensor, that of each gathered tensor on its own (a 1-D tensor)."""
    xs, numels = _validated(xs, process_group, names)
    per_tensor = isinstance(k, (list, tuple))
    if per_tensor:
        rows, ks = list(range(len(xs))), _checks.ranks(k, numels, _checks.Names("xs", names))
    else:
        rows, ks = [0] * len(xs), [_checks.rank(k, sum(numels))]
    keys, _ = _select(xs, rows, ks, process_group)
    values = keys.to(torch.int32).view(torch.float32).to(_ops.magnitude_dtype(xs))
    return values if per_tensor else values[0]


def magnitude_masks(xs, counts, scope: str, process_group, *, names=None) -> list:
    """Local shards of the masks a single process computes on the gathered tensors.
    `counts(numels, label)` gives the entries to prune per row from the gathered numels."""
    xs, numels = _validated(xs, process_group, names)
    ks = counts(numels, _checks.Names("xs", names))
    rows = list(range(len(xs))) if scope == "layer" else [0] * len(xs)
    # Rows that prune nothing still take part in the collectives (with k = 1) and keep all.
    keys, ties_to_prune = _select(xs, rows, [max(k, 1) for k in ks], process_group)
    keys = keys.to(torch.int32)

    # Ties break by global position: earlier tensors of the row (all ranks), then earlier ranks.
    counts = torch.stack([sum(((_keys(c) == keys[r]).sum() for _, c in _chunks(x)),
                              torch.zeros((), dtype=torch.int64, device=x.device))
                          for x, r in zip(xs, rows)])
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=process_group)
    ties = torch.stack(gathered)  # [rank, tensor]
    earlier_ranks = ties[:dist.get_rank(process_group)].sum(0)
    per_tensor = ties.sum(0)
    earlier_tensors = per_tensor.cumsum(0) - per_tensor if scope == "global" \
        else torch.zeros_like(per_tensor)
    offsets = earlier_tensors + earlier_ranks

    masks = []
    for i, (x, r) in enumerate(zip(xs, rows)):
        mask = torch.ones(x.numel(), dtype=torch.bool, device=x.device)
        if ks[r]:
            seen = offsets[i]
            for start, chunk in _chunks(x):
                k = _keys(chunk)
                tied = k == keys[r]
                rank_among_ties = torch.cumsum(tied, 0) + seen
                mask[start:start + chunk.numel()] = ~(
                    (k < keys[r]) | (tied & (rank_among_ties <= ties_to_prune[r])))
                seen = seen + tied.sum()
        masks.append(mask.reshape(x.shape))
    return masks
