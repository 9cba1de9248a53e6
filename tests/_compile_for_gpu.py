"""Compile every Triton kernel variant the ops launch for a CUDA GPU, without a GPU.

CI has no GPU and runs the kernels in Triton's interpreter, which never lowers them: an op the
GPU compiler rejects, or a layout that loses the 128-bit accesses, would pass there. This
script stands in a driver that reports a CUDA target (argv[1], e.g. 90 for an H100), turns
every launch into a compile-only warm-up, drives the Triton backend's ops over CPU tensors
(the kernels never run, so their results are garbage and unused), and prints one JSON line per
compiled variant: kernel, constexprs, shared memory, the PTX's global memory instructions
and its count of fused multiply-adds.
Run it without TRITON_INTERPRET.
"""

import collections
import json
import re
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    """What Triton's launcher asks of a driver before it compiles."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_only(variants):
    launch = JITFunction.run

    def warm_up(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {name: str(value) for name, value in kwargs.items() if name.isupper()}
        ptx = kernel.asm["ptx"]
        variants[(self.fn.__name__, tuple(sorted(constexprs.items())))] = {
            "kernel": self.fn.__name__,
            "constexprs": constexprs,
            "shared": kernel.metadata.shared,
            "memory": collections.Counter(re.findall(r"\b((?:ld|st)\.global\.[\w.]+)", ptx)),
            "fused": len(re.findall(r"\bfma\.", ptx)),
        }

    JITFunction.run = warm_up


def drive_every_op():
    from dsd_kernels.backends.triton import mask, optim, threshold

    full_and_tail = 2 * max(threshold.CHUNK, mask.CHUNK, optim.CHUNK) + 3
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        aligned = [torch.randn(full_and_tail).to(dtype), torch.randn(5).to(dtype)]
        unaligned = [torch.randn(full_and_tail + 1).to(dtype)[1:]]
        for xs in (aligned, unaligned):
            threshold.kth_smallest_abs(xs, 7)
            for scope in ("layer", "global"):
                numels = [x.numel() for x in xs]
                ks = [n // 2 for n in numels] if scope == "layer" else [sum(numels) // 2]
                masks = mask.magnitude_masks(xs, ks, scope)
            mask.apply_masks_(xs, masks)
            mask.fill_pruned_(xs, masks, [-0.0, 1e-2][:len(xs)])
            grads, states = [torch.randn_like(x) for x in xs], [torch.zeros_like(x) for x in xs]
            for momentum, nesterov, grad_scale in ((0.0, False, None), (0.9, False, None),
                                                   (0.9, True, torch.tensor(2.0))):
                optim.masked_sgd_(xs, grads, states, masks, 0.1, momentum, 0.0, 0.01, nesterov,
                                  False, grad_scale)
            for decoupled in (False, True):
                optim.masked_adam_(xs, grads, states, [s.clone() for s in states], masks,
                                   [1.0] * len(xs), 1e-3, 0.9, 0.999, 1e-8, 0.01, decoupled,
                                   decoupled, None)


if __name__ == "__main__":
    driver.set_active(CompileOnlyDriver(int(sys.argv[1])))
    variants = {}
    compile_only(variants)
    drive_every_op()
    for variant in variants.values():
        print(json.dumps(variant))
