"""Host time of one masked AdamW step on the Triton (CUDA) path, launches stubbed, against
torch.optim.AdamW(fused=True)'s step on the same number of tensors, in the same run.

    python bench/bench_step_overhead.py                 # this CPU, no GPU needed
    python bench/bench_step_overhead.py --device cuda   # also the real steps on the GPU

Lists: ResNet-50's 161 parameter tensors and GPT-2 small's 148, masks on every matrix.
The stub: every Triton launch becomes a compile-only warm-up (JITFunction.run with
warmup=True, as tests/_compile_for_gpu.py does), so Triton still binds the arguments,
computes the specialization key and finds the compiled kernel, which is all the host work of
a launch but the driver call. On a CPU, Triton gets that script's stand-in driver (target
sm_90), the Triton kernels are registered for CPU tensors, and the tensors have their real
sizes (so the chunk tables do) but their memory is never touched. CPU tensors skip the
pinned-memory upload of the tables and the device switch: the steady state needs neither.

Rows of dsd (seconds are host time per MaskedAdamW.step):
- "cached, same grads": the steady state of a training loop whose gradients come back where
  they were (what CUDA's caching allocator usually gives after zero_grad(set_to_none=True));
- "cached, grads moved": gradients at new addresses every step (two sets alternate; the
  time of assigning them alone is subtracted): the gradients' table is built and sent again;
- "uncached": the optimizer's plans and every table built every step (both dropped before
  each);
- "op not run": MaskedAdamW.step with a no-op kernel: dsd_kernels.optim's own Python work
  and the dispatcher's passing of the lists to a Python kernel.
torch fused runs for real on one-element CPU tensors, the closest measure of its per-step
host work without a GPU. Part of it is its `_foreach_add_` of the step counts, one kernel per
CPU tensor, which on a GPU is one launch: timed alone in the row after it. Every row is timed
call by call in turn with torch's fused step, and x_torch is the ratio of the two medians, so
that another job slowing this machine's CPU slows both sides alike. With --device
cuda the same rows are timed on CUDA tensors (real driver, launches still stubbed), and then
both real steps on the GPU: their device time per step, their first call (compile included),
and their host time: the step call alone, the GPU idle when it starts (synchronised between
calls, outside the timing), dsd's and torch's taken in turn. Rows are written after each
tensor list.
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the stub needs compiled kernels, not interpreted

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import dsd_kernels as dk  # noqa: E402

from _cases import gpt2_small_shapes, resnet50_shapes  # noqa: E402
from _timing import (  # noqa: E402
    environment,
    first_call_seconds,
    median_seconds,
    print_table,
    write_rows,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from dsd_kernels.backends.triton import mask, optim, tables  # noqa: E402

from _compile_for_gpu import CompileOnlyDriver  # noqa: E402

ADAMW = dict(lr=1e-3, weight_decay=1e-2)
COLUMNS = ["case", "impl", "ms", "x_torch", "builds/step", "uploads/step"]


@contextmanager
def stubbed_launches():
    """Every Triton launch a compile-only warm-up: all of a launch's host work but the
    driver call."""
    launch = JITFunction.run

    def warm_up(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = warm_up
    try:
        yield
    finally:
        JITFunction.run = launch


@contextmanager
def serving(device: str, kernels: dict):
    """The given kernels for the device's dispatch key, the torch backend elsewhere."""
    dk.use_backend("torch")
    lib = torch.library.Library("dsd", "IMPL")
    for op, kernel in kernels.items():
        lib.impl(op, kernel, "CUDA" if device == "cuda" else "CPU")
    try:
        yield
    finally:
        lib._destroy()
        dk.use_backend("auto")


TRITON = {"masked_adam_": optim.masked_adam_, "apply_masks_": mask.apply_masks_}


def _masked_adamw(shapes, device, untouched: bool):
    """A MaskedAdamW over parameters of these shapes, with state, gradients and masks on the
    matrices; with `untouched`, memory no stubbed step ever touches is left unwritten."""
    make = torch.empty if untouched else torch.randn
    params = [torch.nn.Parameter(make(shape, device=device)) for shape in shapes]
    for p in params:
        p.grad = make(p.shape, device=device)
    opt = dk.MaskedAdamW(params, **ADAMW)
    state = torch.empty_like if untouched else torch.zeros_like
    for p in params:  # the state a first step would create
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": state(p), "exp_avg_sq": state(p)}
    opt.set_masks({p: torch.rand(p.shape, device=device) > 0.5 for p in params if p.dim() > 1})
    return params, opt


def _per_call(fn, counters):
    """fn, counting its calls, and the per-call growth of `counters` (functions -> int)."""
    calls, start = [0], [c() for c in counters]

    def counted():
        calls[0] += 1
        fn()

    def growth():
        return [(c() - s) / max(calls[0], 1) for c, s in zip(counters, start)]
    return counted, growth


def _paired_seconds(fn, reference, min_time: float,
                    between=lambda: None) -> tuple[float, float]:
    """Median seconds per call of fn and of reference, called in turn: on a machine where
    other work slows the CPU now and then, both see the same slowdowns, so their ratio holds
    where separate medians would not. `between` runs before each call, untimed."""
    fn()
    reference()
    times, reference_times, start = [], [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        between()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        between()
        t2 = time.perf_counter()
        reference()
        times.append(t1 - t0)
        reference_times.append(time.perf_counter() - t2)
    return statistics.median(times), statistics.median(reference_times)


def _host_rows(case, shapes, device, min_time, env):
    """The stubbed dsd rows and torch fused on one-element tensors, for one tensor list; each
    row's x_torch from its calls taken in turn with torch's fused step."""
    rows = []
    uploads = [0]
    upload = tables.upload
    tiny = [torch.nn.Parameter(torch.zeros(1)) for _ in shapes]
    for p in tiny:
        p.grad = torch.ones(1)
    fused = torch.optim.AdamW(tiny, **ADAMW, fused=True)

    def counted_upload(device_, *host):
        uploads[0] += 1
        return upload(device_, *host)

    tables.upload = counted_upload
    counters = [lambda: optim._TABLES.builds, lambda: uploads[0]]

    def row(impl, fn, per_step=lambda: (None, None), subtract=None):
        """A row for fn (less the time of `subtract`), timed in turn with torch's step."""
        seconds, torch_seconds = _paired_seconds(fn, fused.step, min_time)
        if subtract is not None:
            seconds -= median_seconds(subtract, "cpu", min_time=min_time)
        builds, uploads_ = per_step()
        rows.append(dict(env, op="step_overhead", case=case, tensors=len(shapes),
                         numel=sum(torch.Size(s).numel() for s in shapes), impl=impl,
                         seconds=seconds, x_torch=seconds / torch_seconds,
                         torch_fused_seconds=torch_seconds, builds_per_step=builds,
                         uploads_per_step=uploads_, load_avg_1min=os.getloadavg()[0]))
        print(f"  {case:>24}  {impl:<50} {seconds * 1e3:.3f} ms "
              f"({seconds / torch_seconds:.2f}x torch's)", flush=True)

    try:
        with serving(device, TRITON), stubbed_launches():
            params, opt = _masked_adamw(shapes, device, untouched=device == "cpu")
            opt.step()  # compiles the variants once
            row("dsd MaskedAdamW, cached, same grads", *_per_call(opt.step, counters))

            grads = [[p.grad for p in params], [torch.empty_like(p) for p in params]]
            turn = [0]

            def swap():
                turn[0] ^= 1
                for p, g in zip(params, grads[turn[0]]):
                    p.grad = g

            def swap_and_step():
                swap()
                opt.step()

            row("dsd MaskedAdamW, cached, grads moved", *_per_call(swap_and_step, counters),
                subtract=swap)

            def uncached():
                optim._TABLES.clear()
                opt._plans = ()
                opt.step()

            row("dsd MaskedAdamW, uncached", *_per_call(uncached, counters))
        with serving(device, {"masked_adam_": lambda *args: None}):
            row("dsd MaskedAdamW, op not run", opt.step)
        params = opt = None  # freed before the next case allocates
    finally:
        tables.upload = upload

    row("torch AdamW fused, 1-element CPU tensors", fused.step)
    steps = [fused.state[p]["step"] for p in tiny]
    row("torch AdamW fused: its _foreach_add_ of the steps",
        lambda: torch._foreach_add_(steps, 1))
    return rows


def _device_rows(case, shapes, min_time, env):
    """Both real steps on the GPU: device time per step (median), first call, and host time
    per step (the call alone, taken in turn with torch's)."""
    rows, steps = [], []
    dk.use_backend("triton")
    for impl, make in [("dsd MaskedAdamW (real step)", lambda ps: dk.MaskedAdamW(ps, **ADAMW)),
                       ("torch AdamW fused (real step)",
                        lambda ps: torch.optim.AdamW(ps, **ADAMW, fused=True))]:
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        if isinstance(opt, dk.MaskedAdamW):
            opt.set_masks({p: torch.rand(p.shape, device="cuda") > 0.5
                           for p in params if p.dim() > 1})
        first = first_call_seconds(opt.step, "cuda")
        seconds = median_seconds(opt.step, "cuda", min_time=min_time)
        rows.append(dict(env, op="step_overhead", case=case, tensors=len(shapes),
                         numel=sum(p.numel() for p in params), impl=impl,
                         first_call_seconds=first, seconds=seconds))
        print(f"  {case:>24}  {impl:<44} {seconds * 1e3:.3f} ms "
              f"(first call {first * 1e3:.1f} ms)", flush=True)
        steps.append(opt.step)
    for r in rows:
        r["x_torch"] = r["seconds"] / rows[-1]["seconds"]
    dsd_host, torch_host = _paired_seconds(*steps, min_time, between=torch.cuda.synchronize)
    for impl, seconds in [("dsd MaskedAdamW (real step, host time)", dsd_host),
                          ("torch AdamW fused (real step, host time)", torch_host)]:
        rows.append(dict(env, op="step_overhead", case=case, tensors=len(shapes),
                         numel=rows[0]["numel"], impl=impl, seconds=seconds,
                         x_torch=seconds / torch_host, torch_fused_seconds=torch_host))
        print(f"  {case:>24}  {impl:<44} {seconds * 1e3:.3f} ms "
              f"({seconds / torch_host:.2f}x torch's)", flush=True)
    steps = None  # frees both optimizers' tensors before the next case allocates
    dk.use_backend("auto")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds each measurement runs at least")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: a step's host work is one thread, "
                   "and tiny ops on more threads stall on a busy core)")
    p.add_argument("--out", help="JSON rows (default: bench/results/<device>_step_overhead.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        driver.set_active(CompileOnlyDriver(90))
    env = environment(args.device)
    print(f"step overhead: {env['device_name']}, {env['cpu_threads']} threads")
    path = Path(args.out or Path(__file__).parent / "results" /
                f"{args.device}_step_overhead.json")
    rows = []
    for case, shapes in [("resnet50", resnet50_shapes()), ("gpt2-small", gpt2_small_shapes())]:
        case = f"{case} ({len(shapes)} tensors)"
        rows += _host_rows(case, shapes, args.device, args.min_time, env)
        write_rows(path, rows)
        if args.device == "cuda":
            rows += _device_rows(case, shapes, args.min_time, env)
            write_rows(path, rows)
    print_table([{"case": r["case"], "impl": r["impl"], "ms": f"{r['seconds'] * 1e3:.3f}",
                  "x_torch": r["x_torch"], "builds/step": r.get("builds_per_step"),
                  "uploads/step": r.get("uploads_per_step")} for r in rows], COLUMNS)
    print(f"rows written to {path}")


if __name__ == "__main__":
    main()
