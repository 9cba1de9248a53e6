"""The C++ CPU backend beyond the shared op tests: how it builds, how it falls back, and its
kernels against the pure-torch backend on sizes that split across threads and on adversarial
ties (everything equal, k inside a tied bucket, -0.0 against +0.0, denormals)."""

import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES

import dsd_kernels as dk
from dsd_kernels._ops import OPS
from dsd_kernels.backends import BackendUnavailable, cpp, torch_ref

import _oracle

ROOT = Path(__file__).resolve().parents[1]
THREADS = [1, 3]  # 3 on any core count: odd splits of the chunks
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def cpp_backend():
    try:
        dk.use_backend("cpp")
    except BackendUnavailable as reason:
        if os.environ.get("CI"):  # CI builds the extension: there a missing one is a failure
            raise
        pytest.skip(str(reason))
    yield
    dk.use_backend("auto")


@pytest.fixture(params=THREADS, ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _run_python(script: str, **env) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key != "DSD_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that -0.0 and +0.0 (or two NaNs) compare as what they are."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ---- building and loading -------------------------------------------------------------------

def test_schemas_match_the_dsd_ops(cpp_backend):
    for op in OPS:
        mine = str(getattr(torch.ops.dsd_cpp, op).default._schema)
        assert mine.replace("dsd_cpp::", "dsd::") == str(getattr(torch.ops.dsd, op).default._schema)


FALLBACK_SCRIPT = """
    import json, logging, torch
    import dsd_kernels as dk
    from dsd_kernels.backends import cpp
    cpp._prebuilt_library = lambda isa: None  # only the just-in-time build is under test
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("dsd_kernels").addHandler(handler)
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    threshold = dk.kth_smallest_abs(x, 300)
    masks = dk.magnitude_masks([x], 0.3)
    dk.use_backend("auto")
    try:
        dk.use_backend("cpp")
        raised = None
    except dk.BackendUnavailable as error:
        raised = str(error)
    print(json.dumps({
        "selected": dk.selected_backends()["cpu"],
        "threshold_ok": bool(threshold == torch.kthvalue(x.abs(), 300).values),
        "pruned": int((~masks[0]).sum()),
        "messages": messages,
        "raised": raised,
    }))
"""


def test_without_compiler_ops_fall_back_and_say_why_once(tmp_path):
    result = _run_python(FALLBACK_SCRIPT, CXX=str(tmp_path / "no-such-c++"),
                         DSD_KERNELS_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["selected"] == "torch"
    assert report["threshold_ok"] and report["pruned"] == 300
    reason = f"no C++ compiler: '{tmp_path / 'no-such-c++'}' is not on PATH"
    assert [m for m in report["messages"] if "cpp backend unavailable" in m] == [
        f"dsd_kernels: cpp backend unavailable ({reason} (set CXX)); CPU tensors use the "
        "pure-torch backend"]
    assert report["raised"].startswith(f"backend 'cpp' is not available: {reason}")


@pytest.mark.slow  # runs a C++ build
def test_a_build_error_is_the_reason(tmp_path):
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in cpp.SOURCES + cpp.HEADERS:
        (sources / name).write_text((cpp.CSRC / name).read_text())
    broken = "#error deliberately broken\n" + (sources / "ops.cpp").read_text()
    (sources / "ops.cpp").write_text(broken)
    script = f"""
        from pathlib import Path
        from dsd_kernels.backends import BackendUnavailable, cpp
        cpp._prebuilt_library = lambda isa: None
        cpp.CSRC = Path({str(sources)!r})
        try:
            cpp.load()
        except BackendUnavailable as error:
            print("UNAVAILABLE:", error)
    """
    # One ninja job: the broken file, compiled first, fails before the others start.
    result = _run_python(script, DSD_KERNELS_CACHE=str(tmp_path / "cache"), MAX_JOBS="1")
    assert result.returncode == 0, result.stderr
    assert "UNAVAILABLE: building the C++ CPU kernels failed" in result.stdout
    assert "deliberately broken" in result.stdout


@pytest.mark.slow  # compiles every source with -std=c++17 (about a minute)
def test_sources_are_cplusplus17():
    """torch 2.11 builds extensions with -std=c++17 (newer torch with c++20): a C++20-only
    feature in csrc/ breaks the build there, so every source must compile as C++17."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{path}" for path in [*include_paths(), sysconfig.get_paths()["include"]]]
    compiles = [subprocess.Popen([cxx, "-std=c++17", "-fsyntax-only", "-fopenmp", *includes,
                                  str(cpp.CSRC / name)], stderr=subprocess.PIPE, text=True)
                for name in cpp.SOURCES]
    errors = [p.communicate(timeout=600)[1] for p in compiles]
    assert all(p.returncode == 0 for p in compiles), "\n".join(errors)[-4000:]


def test_second_load_does_not_rebuild(cpp_backend):
    isa = cpp.vector_isa()
    library = cpp.library_path(isa)
    if not library.exists():
        pytest.skip("the kernels were loaded from a prebuilt library, not built just-in-time")
    built = {p.name: p.stat().st_mtime_ns for p in cpp.build_directory(isa).iterdir()
             if p.suffix in (".so", ".o")}
    script = """
        import logging, time
        logging.basicConfig(level=logging.INFO)
        from dsd_kernels.backends import cpp
        cpp._prebuilt_library = lambda isa: None
        start = time.perf_counter()
        cpp.load()
        print(time.perf_counter() - start)
    """
    result = _run_python(script)
    assert result.returncode == 0, result.stderr
    assert "built the C++ CPU kernels" not in result.stderr
    assert "compiling" not in result.stderr
    after = {name: (cpp.build_directory(isa) / name).stat().st_mtime_ns for name in built}
    assert after == built
    assert float(result.stdout) < 15  # a build takes about a minute


def test_a_built_library_loads_whichever_ninja_is_on_path(cpp_backend, tmp_path):
    """Once built, the library's fingerprint (sources and flags) matches, so a process with
    another ninja first on PATH (here one that fails, and records that it ran) loads it as it
    is, without running ninja at all."""
    isa = cpp.vector_isa()
    if not cpp.library_path(isa).exists():
        pytest.skip("the kernels were loaded from a prebuilt library, not built just-in-time")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 1\n")
    (fake / "ninja").chmod(0o755)
    script = """
        from dsd_kernels.backends import cpp
        cpp._prebuilt_library = lambda isa: None
        cpp.load()
    """
    result = _run_python(script, PATH=f"{fake}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ran").exists()


# ---- kernels against the pure-torch backend ---------------------------------------------------

def _tensor_list(seed: int) -> list[torch.Tensor]:
    """Mixed dtypes and layouts; the first tensor is large enough to be split across threads
    even per layer."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1_100_000, generator=gen),
        torch.randn(300, 1001, generator=gen).t(),  # strided
        torch.randn(64, 3, 7, 7, generator=gen).bfloat16().to(memory_format=torch.channels_last),
        torch.randn(200_001, generator=gen).half(),
        (torch.randint(-3, 4, (500_000,), generator=gen).float() / 4),  # ties, both zeros
        torch.randn(5, generator=gen),
    ]


def _assert_same_threshold(xs, k):
    got, want = dk.kth_smallest_abs(xs, k), torch_ref.kth_smallest_abs(xs, k)
    assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), f"k={k}"


def _assert_same_masks(xs, sparsity, scope):
    got = dk.magnitude_masks(xs, sparsity, scope)
    want = torch_ref.magnitude_masks(xs, _oracle.counts(xs, sparsity, scope), scope)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.is_contiguous() and g.shape == w.shape
        assert torch.equal(g, w), f"sparsity={sparsity} scope={scope} tensor {i}"


def test_large_lists_match(cpp_backend, threads):
    xs = _tensor_list(seed=threads)
    total = sum(x.numel() for x in xs)
    for k in [1, 2, total // 3, total // 2, total - 1, total]:
        _assert_same_threshold(xs, k)
    for sparsity in [0.3, 0.5, 0.9]:
        for scope in ["layer", "global"]:
            _assert_same_masks(xs, sparsity, scope)


def test_large_single_tensor_uses_the_wide_passes(cpp_backend, threads):
    # 2^22 + 3 elements: above the size where the first pass takes 16-bit digits.
    x = torch.randn((1 << 22) + 3, generator=torch.Generator().manual_seed(1))
    for k in [1, x.numel() // 2, x.numel()]:
        _assert_same_threshold([x], k)
    _assert_same_masks([x], 0.5, "layer")


@pytest.mark.parametrize("numel", [100_003, (1 << 22) + 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal(cpp_backend, threads, dtype, numel):
    # Every entry ties: the first floor(s * N) positions are pruned, across thread chunks.
    x = torch.full((numel,), -0.75, dtype=dtype)
    _assert_same_threshold([x], numel // 2)
    for sparsity in [0.1, 0.5, 0.999]:
        mask = dk.magnitude_masks(x, sparsity)
        pruned = math.floor(sparsity * numel)
        assert not mask[:pruned].any() and mask[pruned:].all()


def test_k_inside_a_heavily_tied_bucket(cpp_backend, threads):
    gen = torch.Generator().manual_seed(2)
    xs = []
    for numel in [700_001, 300_000, 90_000]:
        x = torch.randn(numel, generator=gen)
        tied = torch.rand(numel, generator=gen) < 0.6
        x[tied] = torch.where(torch.rand(numel, generator=gen) < 0.5, 0.5, -0.5)[tied]
        # Neighbours of 0.5 that share all but the last bits: only the last pass separates them.
        near = torch.rand(numel, generator=gen) < 0.05
        x[near] = (0.5 + torch.randint(-4, 5, (numel,), generator=gen) * 2.0**-24)[near]
        xs.append(x)
    below = sum(int((x.abs() < 0.5).sum()) for x in xs)
    ties = sum(int((x.abs() == 0.5).sum()) for x in xs)
    total = sum(x.numel() for x in xs)
    for k in [below + 1, below + ties // 3, below + ties - 1, below + ties]:
        _assert_same_threshold(xs, k)
    for sparsity in [(below + ties // 3) / total, (below + 2 * ties // 3) / total]:
        _assert_same_masks(xs, sparsity, "global")
        _assert_same_masks(xs, sparsity, "layer")


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_tie_by_position(cpp_backend, threads, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400_000, generator=gen)
    zeros = torch.rand(400_000, generator=gen) < 0.4
    x[zeros] = torch.where(torch.rand(400_000, generator=gen) < 0.5, -0.0, 0.0)[zeros]
    x = x.to(dtype)
    assert torch.signbit(x[zeros]).any() and not torch.signbit(x[zeros]).all()
    n_zeros = int(zeros.sum())
    threshold = dk.kth_smallest_abs(x, n_zeros // 2)
    assert float(threshold) == 0.0 and not torch.signbit(threshold)  # +0.0, as |x| gives
    _assert_same_threshold([x], n_zeros // 2)
    for sparsity in [0.1, 0.2, 0.4, 0.6]:
        _assert_same_masks([x], sparsity, "layer")
        _assert_same_masks([x, x.flip(0)], sparsity, "global")


@pytest.mark.parametrize("dtype", DTYPES)
def test_denormals(cpp_backend, threads, dtype):
    gen = torch.Generator().manual_seed(4)
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 1e-6}[dtype]
    x = torch.randn(300_000, generator=gen) * tiny
    x[::7] = torch.randn(x[::7].shape, generator=gen)  # normal numbers among them
    x[::11] = 0.0
    x = x.to(dtype)
    denormals = x[(x != 0) & (x.abs() < torch.finfo(dtype).tiny)]
    assert denormals.numel() > 100_000  # the test really is about denormals
    for k in [1, 50_000, 150_000, 250_000]:
        _assert_same_threshold([x], k)
    for sparsity in [0.2, 0.5, 0.8]:
        _assert_same_masks([x], sparsity, "layer")


# ---- in-place ops and optimizers ------------------------------------------------------------

def _strided_cases(dtype, gen):
    """(tensor, base) pairs: channels_last, a transposed view, a non-dense slice of a base."""
    base = torch.randn(700, 900, generator=gen).to(dtype)
    return [
        (torch.randn(32, 16, 3, 3, generator=gen).to(dtype)
         .to(memory_format=torch.channels_last), None),
        (torch.randn(900, 700, generator=gen).to(dtype).t(), None),
        (base[:, :600], base),
        (torch.randn(300_001, generator=gen).to(dtype), None),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_masks_zeroes_nan_and_keeps_layout(cpp_backend, threads, dtype):
    gen = torch.Generator().manual_seed(5)
    cases = _strided_cases(dtype, gen)
    xs = [x for x, _ in cases]
    for x in xs:
        x[..., :2] = float("nan")  # pruned NaN must become +0.0, kept NaN stays
        x[..., 2:4] = -0.0
    masks = [torch.rand(x.shape, generator=gen) < 0.5 for x in xs]
    want = [x.clone() for x in xs]
    torch_ref.apply_masks_(want, masks)
    outside = cases[2][1][:, 600:].clone()
    strides = [x.stride() for x in xs]
    dk.apply_masks_(xs, masks)
    for x, w, stride in zip(xs, want, strides):
        assert x.stride() == stride
        assert torch.equal(_bits(x), _bits(w))
    assert torch.equal(cases[2][1][:, 600:], outside)


def test_fill_pruned_mixed_dtypes_keep_layout(cpp_backend, threads):
    gen = torch.Generator().manual_seed(6)
    cases = [case for dtype in DTYPES for case in _strided_cases(dtype, gen)]
    xs = [x for x, _ in cases]
    for x in xs:
        x[..., :2] = float("nan")
    masks = [torch.rand(x.shape, generator=gen) < 0.5 for x in xs]
    values = [(-1) ** i * (1 + 2**-11 + 2**-40) * 10.0 ** (i - 6) for i in range(len(xs))]
    values[:3] = [-0.0, float("-nan"), float("inf")]
    want = [x.clone().masked_fill_(~m, v) for x, m, v in zip(xs, masks, values)]
    outside = [base[:, 600:].clone() for _, base in cases if base is not None]
    strides = [x.stride() for x in xs]
    dk.fill_pruned_(xs, masks, values)
    for x, w, stride in zip(xs, want, strides):
        assert x.stride() == stride
        assert torch.equal(_bits(x), _bits(w))
    bases = [base for _, base in cases if base is not None]
    assert all(torch.equal(b[:, 600:], o) for b, o in zip(bases, outside))


def _optimizer_case(dtype, seed, n_states):
    gen = torch.Generator().manual_seed(seed)
    cases = _strided_cases(dtype, gen)
    params = [p for p, _ in cases]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    states = [[torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
              for _ in range(n_states)]
    masks = [torch.rand(p.shape, generator=gen) < 0.6 for p in params]
    masks[3] = None  # a dense parameter among masked ones
    return params, grads, states, masks, [base for _, base in cases]


def _assert_close_and_pruned_zero(got, want, masks, dtype):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOLERANCES[dtype], msg=lambda m: f"tensor {i}: {m}")
        if masks[i] is not None:
            pruned = g[~masks[i]]
            assert torch.equal(_bits(pruned), torch.zeros_like(_bits(pruned)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["adam", "adamw_maximize_scaled"])
def test_adam_matches_on_strided_params(cpp_backend, threads, dtype, variant):
    scale = torch.tensor(512.0) if variant != "adam" else None
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                 decoupled=variant != "adam", maximize=variant != "adam")
    runs = []
    for impl in ["cpp", "torch_ref"]:
        params, grads, (exp_avgs, exp_avg_sqs), masks, bases = _optimizer_case(dtype, 6, 2)
        for step in range(1, 4):
            grads_now = [g * scale.to(dtype) for g in grads] if scale is not None else grads
            if impl == "cpp":
                dk.masked_adam_(params, grads_now, exp_avgs, exp_avg_sqs, masks, step,
                                grad_scale=scale, **hyper)
            else:
                torch_ref.masked_adam_(params, grads_now, exp_avgs, exp_avg_sqs, masks,
                                       [float(step)] * len(params), *hyper.values(), scale)
        runs.append((params + exp_avgs + exp_avg_sqs, bases[2]))
    (got, base_got), (want, base_want) = runs
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    _assert_close_and_pruned_zero(got, want, masks * 3, dtype)
    assert torch.equal(base_got[:, 600:], base_want[:, 600:])  # outside the sliced parameter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant",
                         ["plain", "momentum", "nesterov_wd", "dampening_maximize_scaled"])
def test_sgd_matches_on_strided_params(cpp_backend, threads, dtype, variant):
    hyper = {
        "plain": dict(lr=0.1),
        "momentum": dict(lr=0.1, momentum=0.9),
        "nesterov_wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
        "dampening_maximize_scaled": dict(lr=0.1, momentum=0.8, dampening=0.3, maximize=True),
    }[variant]
    scale = torch.tensor(64.0) if variant.endswith("scaled") else None
    full = dict(lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False) | hyper
    runs = []
    for impl in ["cpp", "torch_ref"]:
        params, grads, (buffers,), masks, _ = _optimizer_case(dtype, 7, 1)
        buffers = buffers if full["momentum"] else []
        for _ in range(3):
            grads_now = [g * scale.to(dtype) for g in grads] if scale is not None else grads
            if impl == "cpp":
                dk.masked_sgd_(params, grads_now, buffers, masks, grad_scale=scale, **hyper)
            else:
                torch_ref.masked_sgd_(params, grads_now, buffers, masks, *full.values(), scale)
        runs.append(params + buffers)
    got, want = runs
    _assert_close_and_pruned_zero(got, want, masks * 2, dtype)
