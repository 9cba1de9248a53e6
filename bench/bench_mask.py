"""Magnitude masks and their application: dsd_kernels against torch.nn.utils.prune's own
L1Unstructured mask computation and its `weight_orig * mask` re-application, and N:M masks
against the torch ops users write for them, measured in the same run.

    python bench/bench_mask.py --device cpu --backend cpp --threads 2 \
        --sizes 1e6,16e6,128e6,resnet50,gpt2 [--dtype bfloat16]

Mask rows: per layer and global (prune.global_unstructured ranks the concatenation, as here).
Apply rows: dsd's in-place bool mask against prune's float mask product (what its forward
pre-hook recomputes on every forward) and an in-place masked_fill_ with a precomputed ~mask.
N:M rows (case "<size>, 2:4"): the tensors that can take the pattern (a size's one tensor as
a matrix of rows of 1024 or fewer entries; a model's weights of 2 or 4 dims), dsd's nm_masks
(and its op alone: the kernels find NaN themselves) against reshape(-1, M) + topk or argsort
+ scatter, and NVIDIA ASP's m4n2_1d.
"""

from itertools import permutations

import torch
from torch.nn.utils import prune

import dsd_kernels as dk

from _cases import Run, cases, make, parser
from _goals import DSD_NM, TORCH_NM_TOPK


def prune_layer_masks(xs, sparsity):
    return [prune.L1Unstructured(sparsity).compute_mask(x, torch.ones_like(x)) for x in xs]


def prune_global_masks(xs, sparsity):
    scores = torch.cat([x.reshape(-1) for x in xs])
    mask = prune.L1Unstructured(sparsity).compute_mask(scores, torch.ones_like(scores))
    return [m.view_as(x) for m, x in zip(mask.split([x.numel() for x in xs]), xs)]


NM = (2, 4)


def nm_weights(xs, m):
    """The tensors an N:M mask takes: a 1-D size as a matrix (rows of the largest of 1024, 256,
    64, 16 or m entries that divides it), a model's tensors of 2+ dims whose dim 1 m divides."""
    out = []
    for x in xs:
        if x.dim() == 1:
            width = next((w for w in (1024, 256, 64, 16, m) if x.numel() % w == 0 and w % m == 0),
                         None)
            x = x.view(-1, width) if width else x
        if dk.nm_eligible(x, NM) and x.dim() in (2, 4):  # the layouts ASP takes
            out.append(x)
    return out


def torch_topk_nm(xs, n, m):
    """How users write N:M masks in torch: groups as rows, topk, scatter into a bool mask."""
    masks = []
    for x in xs:
        moved = x.abs().movedim(1, -1)  # a no-op for a Linear weight
        groups = moved.reshape(-1, m)
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=x.device)
        mask.scatter_(1, groups.topk(n, dim=1).indices, True)
        masks.append(mask.view(moved.shape).movedim(-1, 1))
    return masks


def torch_sort_nm(xs, n, m):
    """The same with a sort: the m - n smallest of each group are pruned."""
    masks = []
    for x in xs:
        moved = x.abs().movedim(1, -1)
        groups = moved.reshape(-1, m)
        mask = torch.ones(groups.shape, dtype=torch.bool, device=x.device)
        mask.scatter_(1, groups.argsort(dim=1)[:, :m - n], False)
        masks.append(mask.view(moved.shape).movedim(-1, 1))
    return masks


# NVIDIA apex's ASP (apex/contrib/sparsity/sparse_masklib.py) re-implemented with the same torch
# ops: create_mask with pattern "m4n2_1d" -> mn_1d_best(matrix, 4, 2) on a 2-D weight, or on a
# conv weight (k, c, r, s) permuted to (r, s, k, c) and viewed as rows of c. The
# valid patterns are computed once, as apex caches them; apex's torch.cuda tensors are on the
# weights' device here.
def asp_valid_patterns(m, n, device):
    patterns = torch.zeros(m)
    patterns[:n] = 1
    return torch.tensor(list(set(permutations(patterns.tolist())))).to(device)


def asp_m4n2_1d(xs, patterns):
    masks = []
    for weight in xs:
        shape, ttype = weight.shape, weight.type()
        t = weight.float().contiguous()
        if len(shape) == 2:
            t = t.view(shape[0], shape[1])
        else:
            t = t.permute(2, 3, 0, 1).contiguous().view(shape[2] * shape[3] * shape[0], shape[1])
        mask = torch.ones(t.shape, dtype=torch.int32, device=t.device).view(-1, 4)
        mat = t.view(-1, 4)  # reshape_1d: shape[1] is a multiple of 4
        pmax = torch.argmax(torch.matmul(mat.abs(), patterns.t()), dim=1)
        mask[:] = patterns[pmax[:]]
        mask = mask.view(t.shape)
        if len(shape) == 4:
            mask = mask.view(shape[2], shape[3], shape[0], shape[1]).permute(2, 3, 0, 1)
        masks.append(mask.contiguous().view(shape).type(ttype))
    return masks


def time_nm(run, case, xs, device):
    """The N:M rows of a case, over its tensors that take the pattern."""
    n, m = NM
    ws = nm_weights(xs, m)
    if not ws:
        return
    case = f"{case}, {n}:{m}"
    numel = sum(w.numel() for w in ws)
    nbytes = numel * (ws[0].element_size() + 1)  # read w, write a bool mask
    run.streaming_read(case, ws)
    run.time(case, numel, DSD_NM, lambda: dk.nm_masks(ws, NM), nbytes, DSD_NM)
    run.time(case, numel, "dsd nm_masks op (no Python checks)",
             lambda: torch.ops.dsd.nm_masks(ws, n, m), nbytes, DSD_NM)
    run.time(case, numel, TORCH_NM_TOPK, lambda: torch_topk_nm(ws, n, m), nbytes, DSD_NM)
    run.time(case, numel, "torch reshape + argsort + scatter",
             lambda: torch_sort_nm(ws, n, m), nbytes, DSD_NM)
    patterns = asp_valid_patterns(4, 2, device)
    run.time(case, numel, "ASP m4n2_1d (apex's torch ops)", lambda: asp_m4n2_1d(ws, patterns),
             nbytes, DSD_NM)


def main():
    args = parser(__doc__.splitlines()[0], "mask").parse_args()
    run = Run(args, "mask")
    for case, shapes in cases(args):
        xs = make(shapes, args)
        numel = sum(x.numel() for x in xs)
        size = xs[0].element_size()
        masks_bytes = numel * (size + 1)  # read w, write a bool mask
        apply_bytes = numel * (2 * size + 1)  # read w and the mask, write w
        s = args.sparsity
        run.streaming_read(case, xs)
        run.time(case, numel, "dsd masks layer", lambda: dk.magnitude_masks(xs, s, "layer"),
                 masks_bytes, "dsd masks layer")
        run.time(case, numel, "prune.L1Unstructured layer (topk)",
                 lambda: prune_layer_masks(xs, s), masks_bytes, "dsd masks layer")
        run.time(case, numel, "dsd masks global", lambda: dk.magnitude_masks(xs, s, "global"),
                 masks_bytes, "dsd masks global")
        run.time(case, numel, "prune global (topk of cat)", lambda: prune_global_masks(xs, s),
                 masks_bytes, "dsd masks global")
        masks = dk.magnitude_masks(xs, s, "layer")
        float_masks = [m.to(x.dtype) for m, x in zip(masks, xs)]
        pruned = [~m for m in masks]
        run.time(case, numel, "dsd apply_masks_ (in place)", lambda: dk.apply_masks_(xs, masks),
                 apply_bytes, "dsd apply_masks_ (in place)")
        run.time(case, numel, "prune weight_orig * mask",
                 lambda: [x * m for x, m in zip(xs, float_masks)], apply_bytes,
                 "dsd apply_masks_ (in place)")
        run.time(case, numel, "masked_fill_(~mask, 0)",
                 lambda: [x.masked_fill_(p, 0) for x, p in zip(xs, pruned)], apply_bytes,
                 "dsd apply_masks_ (in place)")
        masks = float_masks = pruned = None
        time_nm(run, case, xs, args.device)
        xs = None  # freed before the next case allocates
    run.finish()


if __name__ == "__main__":
    main()
