"""Masked optimizer steps: dsd_kernels' MaskedAdamW and MaskedSGD against torch.optim's fused
AdamW and SGD, alone (no mask: the speed of light) and followed by masking the weights and
their state with torch ops, measured in the same run.

    python bench/bench_optim.py --device cpu --backend cpp

Masks prune `--sparsity` of every tensor. Torch's masking comes in two forms: prune-style
multiplication by float masks (torch._foreach_mul_) and in-place masked_fill_ with a
precomputed ~mask. GB/s counts what the step must move: read p, g and the state (and the mask),
write p and the state.
"""

import torch

import dsd_kernels as dk

from _cases import Run, cases, make, parser

ADAMW = dict(lr=1e-3, weight_decay=1e-2)
SGD = dict(lr=1e-2, momentum=0.9)


def _params(weights, grads):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def _time_family(run, case, numel, size, name, weights, grads, masks, state_names, make_dsd,
                 make_torch):
    n_state = len(state_names)
    masked_bytes = numel * ((3 + 2 * n_state) * size + 1)  # read p, g, state, mask; write p, state
    dense_bytes = numel * (3 + 2 * n_state) * size
    reference = f"dsd Masked{name}"

    params = _params(weights, grads)
    opt = make_dsd(params)
    opt.set_masks(dict(zip(params, masks)))
    run.time(case, numel, reference, opt.step, masked_bytes, reference)
    params = opt = None  # freed before the next case allocates

    params = _params(weights, grads)
    opt = make_torch(params)
    run.time(case, numel, f"torch {name} fused (no mask)", opt.step, dense_bytes, reference)
    params = opt = None  # freed before the next case allocates

    float_masks = [m.to(w.dtype) for m, w in zip(masks, weights)]
    params = _params(weights, grads)
    opt = make_torch(params)

    @torch.no_grad()
    def step_then_multiply():
        opt.step()
        targets = params + [opt.state[p][s] for s in state_names for p in params]
        torch._foreach_mul_(targets, float_masks * (1 + n_state))

    run.time(case, numel, f"torch {name} fused + mask p, state (mul_)", step_then_multiply,
             masked_bytes, reference)
    params = opt = float_masks = None  # freed before the next case allocates

    pruned = [~m for m in masks]
    params = _params(weights, grads)
    opt = make_torch(params)

    @torch.no_grad()
    def step_then_fill():
        opt.step()
        for i, p in enumerate(params):
            for t in [p] + [opt.state[p][s] for s in state_names]:
                t.masked_fill_(pruned[i], 0)

    run.time(case, numel, f"torch {name} fused + mask p, state (masked_fill_)", step_then_fill,
             masked_bytes, reference)


def main():
    args = parser(__doc__.splitlines()[0], "optim").parse_args()
    run = Run(args, "optim")
    for case, shapes in cases(args):
        weights = make(shapes, args, seed=0)
        grads = make(shapes, args, seed=1)
        masks = dk.magnitude_masks(weights, args.sparsity, "layer")
        numel = sum(w.numel() for w in weights)
        size = weights[0].element_size()
        _time_family(run, case, numel, size, "AdamW", weights, grads, masks,
                     ["exp_avg", "exp_avg_sq"], lambda ps: dk.MaskedAdamW(ps, **ADAMW),
                     lambda ps: torch.optim.AdamW(ps, **ADAMW, fused=True))
        _time_family(run, case, numel, size, "SGD", weights, grads, masks, ["momentum_buffer"],
                     lambda ps: dk.MaskedSGD(ps, **SGD),
                     lambda ps: torch.optim.SGD(ps, **SGD, fused=True))
        weights = grads = masks = None  # freed before the next case allocates
    run.finish()


if __name__ == "__main__":
    main()
