"""Exact k-th smallest |w| (the pruning threshold): dsd_kernels against torch.kthvalue and
torch.topk on the concatenated |w|, measured in the same run.

    python bench/bench_threshold.py --device cpu --backend cpp --threads 2 \
        --sizes 1e6,16e6,128e6,resnet50,gpt2 [--dtype bfloat16]

Rows per size: "global" (one threshold over all tensors) and, for lists of tensors, "layer"
(one threshold per tensor: `kth_smallest_abs(xs, ks)` with one k per tensor, in one call; and
one call per tensor). "op only" calls torch.ops.dsd directly, skipping the public API's
input validation (which reads every tensor once more to reject NaN/Inf).
"""

import torch

import dsd_kernels as dk

from _cases import Run, cases, make, parser, pruned_count


def _abs_cat(xs):
    return torch.cat([x.abs().reshape(-1) for x in xs])


def main():
    args = parser(__doc__.splitlines()[0], "threshold").parse_args()
    run = Run(args, "threshold")
    for case, shapes in cases(args):
        xs = make(shapes, args)
        numel = sum(x.numel() for x in xs)
        nbytes = numel * xs[0].element_size()  # one read of the weights
        k = max(1, pruned_count(args.sparsity, numel))
        run.streaming_read(case, xs)
        run.time(case, numel, "dsd global", lambda: dk.kth_smallest_abs(xs, k), nbytes,
                 "dsd global")
        run.time(case, numel, "dsd global, op only",
                 lambda: torch.ops.dsd.kth_smallest_abs(xs, k), nbytes, "dsd global")
        run.time(case, numel, "torch.kthvalue global (cat |w|)",
                 lambda: torch.kthvalue(_abs_cat(xs), k), nbytes, "dsd global")
        run.time(case, numel, "torch.topk global (cat |w|)",
                 lambda: torch.topk(_abs_cat(xs), k, largest=False, sorted=False).values.max(),
                 nbytes, "dsd global")
        if len(xs) > 1:
            ks = [max(1, pruned_count(args.sparsity, x.numel())) for x in xs]
            run.time(case, numel, "dsd layer", lambda: dk.kth_smallest_abs(xs, ks), nbytes,
                     "dsd layer")
            run.time(case, numel, "dsd layer, op only",
                     lambda: torch.ops.dsd.kth_smallest_abs_per_tensor(xs, ks), nbytes,
                     "dsd layer")
            run.time(case, numel, "dsd layer, one call per tensor",
                     lambda: [dk.kth_smallest_abs(x, kx) for x, kx in zip(xs, ks)], nbytes,
                     "dsd layer")
            run.time(case, numel, "torch.kthvalue layer",
                     lambda: [torch.kthvalue(x.abs().reshape(-1), kx) for x, kx in zip(xs, ks)],
                     nbytes, "dsd layer")
        xs = None  # freed before the next case allocates
    run.finish()


if __name__ == "__main__":
    main()
