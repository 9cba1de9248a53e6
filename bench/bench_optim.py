"""Masked optimizer steps: for every element-wise torch.optim optimizer (and Adam with amsgrad,
and lion_pytorch's Lion where installed), dsd's masked step against the same optimizer's
unmasked step and against the masking hooks a user would write, measured in the same run.

    python bench/bench_optim.py --device cpu --backend cpp --threads 1 --sizes 16e6,resnet50
    python bench/bench_optim.py --optimizers RMSprop,Adagrad --sizes resnet50   # some of them

Masks prune `--sparsity` of every tensor. Per optimizer and case the rows are:
- "dsd Masked<Name>": `make_masked_` on <Name>(foreach=True where it takes foreach): SGD, Adam
  and AdamW get dsd's fused one-pass kernels, the others (amsgrad too) the general path
  (gradients masked, the optimizer's own step, one pass setting pruned weights and state to a
  fresh state's values);
- "torch <Name> foreach (no mask)" (Lion: "lion_pytorch Lion (no mask)"), and for SGD, Adam
  and AdamW "torch <Name> fused (no mask)": the unmasked step, the least a step costs;
- "... on pruned weights and grads (no mask)": the goal's unmasked step (below) on the data
  the masked step sees (weights and gradients 0 at pruned positions), so its time includes
  what zeros cost the optimizer's own kernels (`x_same_data` divides by it);
- "hook: ...": the goal's unmasked step with the hooks peers register (Cerebras' sparsity):
  before the step each gradient is multiplied by its float mask, after it the weight and
  every state tensor shaped like it, parameter by parameter (`_hook_masking`);
- for AdamW and SGD, torch's fused step followed by masking the weights and their state with
  one `torch._foreach_mul_` by float masks (as prune applies them) or `masked_fill_` with a
  precomputed ~mask per tensor (the GPU goal's comparison, bench/_goals.py).

An optimizer's rows are timed call by call in turn, one call of each per round, so another job
slowing the CPU slows them alike; `x_dsd` and `x_unmasked` are ratios of medians of the same
rounds. `x_unmasked` divides by the unmasked step the goal names (`baseline`: torch's fused
step where dsd's step is fused, else the foreach step, else the optimizer's plain step); dsd's
rows carry the goal of their path (_goals.MASKED_STEP_LIMITS) and its status. GB/s counts what
the step must move: read p, g and the parameter-shaped state (and the mask, for masked rows),
write p and the state.
"""

import inspect
import os
import statistics
import time

import torch

import dsd_kernels as dk
from dsd_kernels.optim import make_masked_

try:  # a third-party optimizer, where installed (a test dependency)
    import lion_pytorch
except ImportError:
    lion_pytorch = None

from _cases import Run, cases, make, parser
from _goals import MASKED_STEP_LIMITS
from _timing import first_call_seconds, print_table, write_rows

# name: (class, hyperparameters). The goal's rows first: a run stopped at a time limit has them.
OPTIMIZERS = {
    "AdamW": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "SGD": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    "Adam": (torch.optim.Adam, dict(lr=1e-3)),
    "Adadelta": (torch.optim.Adadelta, dict(lr=1.0)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=1e-2)),
    "Adamax": (torch.optim.Adamax, dict(lr=2e-3)),
    "ASGD": (torch.optim.ASGD, dict(lr=1e-2)),
    "NAdam": (torch.optim.NAdam, dict(lr=2e-3)),
    "RAdam": (torch.optim.RAdam, dict(lr=1e-3)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9)),
    "Rprop": (torch.optim.Rprop, dict(lr=1e-2)),
    "Adam(amsgrad)": (torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
}
if lion_pytorch is not None:
    OPTIMIZERS["Lion"] = (lion_pytorch.Lion, dict(lr=1e-4, weight_decay=1e-2))
FUSED_CLASSES = (dk.MaskedSGD, dk.MaskedAdam, dk.MaskedAdamW)  # the rest: the general path
TORCH_MASKING = ("AdamW", "SGD")  # also timed followed by torch's own masking ops
SUMMARY_COLUMNS = ["case", "optimizer", "path", "dsd / unmasked", "goal", "status",
                   "dsd / foreach", "dsd / same data", "hook / unmasked", "hook / dsd"]


def _params(weights, grads):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def _hook_masking(opt, params, masks) -> None:
    """Mask `opt` with step hooks as peers do (Cerebras' sparsity): each gradient times its
    float mask before the step; after it each weight and every state tensor shaped like it,
    parameter by parameter."""
    float_masks = [m.to(p.dtype) for p, m in zip(params, masks)]

    @torch.no_grad()
    def mask_grads(optimizer, args, kwargs):
        for p, m in zip(params, float_masks):
            p.grad.mul_(m)

    @torch.no_grad()
    def mask_weights_and_state(optimizer, args, kwargs):
        for p, m in zip(params, float_masks):
            p.mul_(m)
            for s in optimizer.state[p].values():
                if isinstance(s, torch.Tensor) and s.shape == p.shape:
                    s.mul_(m)

    opt.register_step_pre_hook(mask_grads)
    opt.register_step_post_hook(mask_weights_and_state)


def _torch_masking(opt, params, masks, how: str):
    """torch's step followed by masking the weights and their state: one _foreach_mul_ by
    float masks, or masked_fill_ with a precomputed ~mask per tensor."""
    if how == "mul_":
        float_masks = [m.to(p.dtype) for p, m in zip(params, masks)]

        @torch.no_grad()
        def step_then_multiply():
            opt.step()
            targets, factors = [], []
            for p, m in zip(params, float_masks):
                state = [s for s in opt.state[p].values()
                         if isinstance(s, torch.Tensor) and s.shape == p.shape]
                targets += [p, *state]
                factors += [m] * (1 + len(state))
            torch._foreach_mul_(targets, factors)
        return step_then_multiply

    pruned = [~m for m in masks]

    @torch.no_grad()
    def step_then_fill():
        opt.step()
        for p, keep_not in zip(params, pruned):
            p.masked_fill_(keep_not, 0)
            for s in opt.state[p].values():
                if isinstance(s, torch.Tensor) and s.shape == p.shape:
                    s.masked_fill_(keep_not, 0)
    return step_then_fill


def _label(*words) -> str:
    return " ".join(w for w in words if w)


def _impls(name, weights, grads, masks):
    """The rows' step functions of one optimizer, by impl; the impl `x_unmasked` divides by,
    its optimizer, and the path of dsd's masked step. Gradients a step masks in place are its
    own copies."""
    cls, hyper = OPTIMIZERS[name]
    lib = cls.__module__.split(".")[0]
    foreach = {"foreach": True} if "foreach" in inspect.signature(cls).parameters else {}
    params = _params(weights, [g.clone() for g in grads])
    masked = make_masked_(cls(params, **hyper, **foreach))
    masked.set_masks(dict(zip(params, masks)))
    path = "fused" if isinstance(masked, FUSED_CLASSES) else "general"
    impls = {f"dsd Masked{name}": masked.step}
    # The goal's unmasked step last: fused where dsd's is, else foreach, else the plain step.
    kinds = [("foreach", foreach)] if foreach else [("", {})]
    kinds += [("fused", {"fused": True})] if path == "fused" else []
    for how, flags in kinds:
        unmasked = cls(_params(weights, grads), **hyper, **flags)
        impls[_label(lib, name, how, "(no mask)")] = unmasked.step
    pruned_weights = [w * m for w, m in zip(weights, masks)]
    pruned_grads = [g * m for g, m in zip(grads, masks)]
    impls[_label(lib, name, how, "on pruned weights and grads (no mask)")] = cls(
        _params(pruned_weights, pruned_grads), **hyper, **flags).step
    params = _params(weights, [g.clone() for g in grads])
    hooked = cls(params, **hyper, **flags)
    _hook_masking(hooked, params, masks)
    impls[f"hook: mask grads, {_label(name, how, 'step')}, mul_ p and state per parameter"] = \
        hooked.step
    if name in TORCH_MASKING:
        for masking in ("mul_", "masked_fill_"):
            params = _params(weights, grads)
            opt = cls(params, **hyper, fused=True)
            impls[f"torch {name} fused + mask p, state ({masking})"] = _torch_masking(
                opt, params, masks, masking)
    return impls, _label(lib, name, how, "(no mask)"), unmasked, path


def _state_tensors(opt) -> int:
    """How many state tensors of the first parameter are shaped like it (after a step)."""
    p = opt.param_groups[0]["params"][0]
    return sum(isinstance(s, torch.Tensor) and s.shape == p.shape
               for s in opt.state[p].values())


def in_turn_seconds(fns: dict, device: str, min_time: float,
                    min_rounds: int = 5) -> tuple[dict, int]:
    """Median seconds per call of each fn, calling each once per round (starting one further
    along each round) until every fn has had `min_time` on average and at least
    `min_rounds` rounds ran; after one untimed warm-up call of each. Returns the medians and
    the number of rounds."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    names = list(fns)
    for name in names:
        fns[name]()
    synchronize()
    times = {name: [] for name in names}
    rounds, start = 0, time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - start < min_time * len(names):
        for i in range(len(names)):
            name = names[(rounds + i) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            synchronize()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def _time_optimizer(run, case, numel, size, name, weights, grads, masks) -> None:
    impls, baseline, unmasked, path = _impls(name, weights, grads, masks)
    reference = f"dsd Masked{name}"
    first = {impl: first_call_seconds(fn, run.args.device) for impl, fn in impls.items()}
    seconds, rounds = in_turn_seconds(impls, run.args.device, run.args.min_time)
    n_state = _state_tensors(unmasked)
    same_data = baseline.replace("(no mask)", "on pruned weights and grads (no mask)")
    _, hyper = OPTIMIZERS[name]
    for impl in impls:
        masked = not impl.endswith("(no mask)")
        nbytes = numel * ((3 + 2 * n_state) * size + masked)
        row = dict(run.env, op=run.op, case=case, numel=numel, dtype=run.args.dtype,
                   sparsity=run.args.sparsity, impl=impl, reference=reference,
                   optimizer=name, hyperparameters=hyper, path=path, baseline=baseline,
                   state_tensors=n_state, rounds=rounds, first_call_seconds=first[impl],
                   seconds=seconds[impl], bytes=nbytes, gbps=nbytes / seconds[impl] / 1e9,
                   copy_gbps=run.copy_gbps, load_avg_1min=os.getloadavg()[0],
                   load_avg_1_5_15min=os.getloadavg(), error=None,
                   x_dsd=seconds[impl] / seconds[reference],
                   x_unmasked=seconds[impl] / seconds[baseline],
                   x_same_data=seconds[impl] / seconds[same_data], x_read=None,
                   x_one_read=None)
        row["pct_copy"] = 100 * row["gbps"] / run.copy_gbps
        if impl == reference:
            limit = MASKED_STEP_LIMITS[path]
            row.update(goal=f"<= {limit:g}",
                       status="pass" if row["x_unmasked"] <= limit else "fail")
        run.rows.append(row)
        print(f"  {case:>22}  {impl:<70} {seconds[impl] * 1e3:9.3f} ms  "
              f"x_unmasked {row['x_unmasked']:.3f}", flush=True)
    write_rows(run.path, run.rows)


def summary(rows: list[dict]) -> list[dict]:
    """Per case and optimizer: dsd's masked step over the unmasked step (the goal's, the
    foreach one, the goal's on pruned data), and the hooks over the goal's unmasked step and
    over dsd's step."""
    out = []
    for dsd in (r for r in rows if r.get("status")):
        mine = {r["impl"]: r for r in rows
                if r["case"] == dsd["case"] and r["optimizer"] == dsd["optimizer"]}
        hook = next(r for impl, r in mine.items() if impl.startswith("hook"))
        foreach = mine.get(f"torch {dsd['optimizer']} foreach (no mask)")
        out.append({"case": dsd["case"], "optimizer": dsd["optimizer"], "path": dsd["path"],
                    "dsd / unmasked": dsd["x_unmasked"], "goal": dsd["goal"],
                    "status": dsd["status"],
                    "dsd / foreach": dsd["seconds"] / foreach["seconds"] if foreach else None,
                    "dsd / same data": dsd["x_same_data"], "hook / unmasked": hook["x_unmasked"],
                    "hook / dsd": hook["x_dsd"]})
    return out


def main(argv=None):
    p = parser(__doc__.splitlines()[0], "optim")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated, of {', '.join(OPTIMIZERS)} (default: all)")
    args = p.parse_args(argv)
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        p.error(f"unknown optimizers {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    run = Run(args, "optim")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    for case, shapes in cases(args):
        weights = make(shapes, args, seed=0)
        grads = make(shapes, args, seed=1)
        masks = dk.magnitude_masks(weights, args.sparsity, "layer")
        numel = sum(w.numel() for w in weights)
        size = weights[0].element_size()
        for name in names:
            _time_optimizer(run, case, numel, size, name, weights, grads, masks)
        weights = grads = masks = None  # freed before the next case allocates
    run.finish()
    print_table(summary(run.rows), SUMMARY_COLUMNS)


if __name__ == "__main__":
    main()
