"""Every Triton kernel variant compiles for the GPUs we target, with the memory accesses that
its bandwidth rests on. CI has no GPU to time the kernels, so the PTX is read instead:
full chunks of 16-byte aligned tensors must move their data in vectors, and the optimizer
must not route values through shared memory to change layouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # each architecture's fixture compiles every kernel variant

from dsd_kernels.backends.triton import mask, optim, threshold  # noqa: E402

# Largest shared memory a block may use, in bytes: H100 (sm_90) and A100 (sm_80).
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}
SCRIPT = Path(__file__).with_name("_compile_for_gpu.py")


@pytest.fixture(scope="module", params=sorted(MAX_SHARED), ids=lambda arch: f"sm_{arch}")
def compiled(request):
    """(arch, the variants the ops launch, compiled for it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), str(request.param)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return request.param, [json.loads(line) for line in run.stdout.splitlines()]


def full_aligned(variants, kernel=None):
    chosen = [v for v in variants if v["constexprs"].get("FULL") == "True"
              and v["constexprs"].get("ALIGNED") == "True"
              and kernel in (None, v["kernel"])]
    assert chosen, f"no full, aligned variant of {kernel or 'any kernel'} was compiled"
    return chosen


def test_every_kernel_compiles(compiled):
    _, variants = compiled
    kernels = {name for module in (threshold, mask, optim) for name in vars(module)
               if name.endswith("_kernel")}
    assert kernels == {v["kernel"] for v in variants}
    dtypes = {v["constexprs"]["DTYPE"] for v in variants if "DTYPE" in v["constexprs"]}
    assert dtypes == {"fp32", "fp16", "bf16"}


def test_shared_memory_fits_one_block(compiled):
    arch, variants = compiled
    too_big = [(v["kernel"], v["shared"]) for v in variants if v["shared"] > MAX_SHARED[arch]]
    assert not too_big


# Scalar loads that are not element-wise: the fill kernel reads its tensor's fp16/bf16 value
# once per program.
PER_PROGRAM_LOADS = {("_fill_pruned_kernel", "ld.global.b16"): 1}


def test_full_chunks_load_vectors(compiled):
    """No element-wise loads of data or mask bytes; the data comes in 128-bit vectors."""
    _, variants = compiled
    for v in full_aligned(variants):
        scalar = {op for op, count in v["memory"].items() if op in ("ld.global.b8", "ld.global.b16")
                  and count > PER_PROGRAM_LOADS.get((v["kernel"], op), 0)}
        assert not scalar, (v["kernel"], v["constexprs"], v["memory"])
        if v["kernel"] != "_fill_pruned_kernel":  # it reads only the mask
            assert "ld.global.v4.b32" in v["memory"], (v["kernel"], v["constexprs"])


def test_optimizer_stores_vectors_without_layout_changes(compiled):
    _, variants = compiled
    for v in full_aligned(variants, "_masked_optim_kernel"):
        scalar = {op for op in v["memory"] if op in ("st.global.b16", "st.global.b32")}
        assert not scalar, (v["constexprs"], v["memory"])
        assert v["shared"] == 0, v["constexprs"]


def test_mask_kernel_stores_mask_bytes_in_vectors(compiled):
    _, variants = compiled
    for v in full_aligned(variants, "_mask_kernel"):
        if v["constexprs"]["WRITE"] == "True":
            assert "st.global.b8" not in v["memory"], (v["constexprs"], v["memory"])


def test_no_kernel_fuses_multiply_adds(compiled):
    """The optimizer's math is the reference's, rounding after every multiply and add: an fma
    rounds once, so fused steps would drift from torch_ref (and change with Triton's default,
    which 3.10 flips). The other kernels have no float arithmetic to fuse."""
    _, variants = compiled
    fused = {(v["kernel"], v["constexprs"].get("DTYPE"), v["constexprs"].get("ADAM"))
             for v in variants if v["fused"]}
    assert not fused, sorted(fused)
