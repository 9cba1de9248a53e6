"""Magnitude masks and their application: dsd_kernels against torch.nn.utils.prune's own
L1Unstructured mask computation and its `weight_orig * mask` re-application, measured in the
same run.

    python bench/bench_mask.py --device cpu --backend cpp --threads 2 \
        --sizes 1e6,16e6,128e6,resnet50,gpt2 [--dtype bfloat16]

Mask rows: per layer and global (prune.global_unstructured ranks the concatenation, as here).
Apply rows: dsd's in-place bool mask against prune's float mask product (what its forward
pre-hook recomputes on every forward) and an in-place masked_fill_ with a precomputed ~mask.
"""

import torch
from torch.nn.utils import prune

import dsd_kernels as dk

from _cases import Run, cases, make, parser


def prune_layer_masks(xs, sparsity):
    return [prune.L1Unstructured(sparsity).compute_mask(x, torch.ones_like(x)) for x in xs]


def prune_global_masks(xs, sparsity):
    scores = torch.cat([x.reshape(-1) for x in xs])
    mask = prune.L1Unstructured(sparsity).compute_mask(scores, torch.ones_like(scores))
    return [m.view_as(x) for m, x in zip(mask.split([x.numel() for x in xs]), xs)]


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
        xs = masks = float_masks = pruned = None  # freed before the next case allocates
    run.finish()


if __name__ == "__main__":
    main()
