"""The Triton backend's cached tables on two CUDA streams (docs/design.md, "Triton launch
tables"): a stream is held back with a spinning kernel (torch.cuda._sleep) while the host
issues calls on the other, so a table read on a stream it was not uploaded on would be read
before its copy lands, or after its memory went to another table. Every result is compared
with the pure-torch backend: thresholds and masks bit for bit, optimizer steps within the
dtype's tolerance.

CUDA only: the interpreter runs every launch at once, on the host. The stand-in streams of
tests/test_triton_backend.py check the same cache keys without a GPU.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("races CUDA streams", allow_module_level=True)

from conftest import TOLERANCES  # noqa: E402

from dsd_kernels.backends import torch_ref  # noqa: E402
from dsd_kernels.backends.triton import tables  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_backend")

# ~0.1 s on an H100: the host issues all of the other stream's calls while it spins.
DELAY_CYCLES = 200_000_000
OPS = ["select", "apply", "sgd", "adam"]


def _weights(seed):
    """A list of every dtype: a tensor of full and tail chunks big enough to be bracketed, a
    small one and a matrix."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(40_000, generator=generator).cuda(),
            torch.randn(300, generator=generator).half().cuda(),
            torch.randn(7, 9, generator=generator).bfloat16().cuda()]


def _state(op, seed):
    """The tensors one call of `op` reads and writes."""
    xs = _weights(seed)
    if op == "select":
        return {"xs": xs}
    generator = torch.Generator().manual_seed(seed + 1000)
    masks = [(torch.rand(x.shape, generator=generator) > 0.4).cuda() for x in xs]
    if op == "apply":
        return {"xs": xs, "masks": masks}
    state = {"params": xs, "grads": [torch.randn_like(x) for x in xs], "masks": masks,
             "exp_avgs": [torch.randn_like(x) * 0.1 for x in xs]}
    if op == "adam":
        state["exp_avg_sqs"] = [torch.rand_like(x) * 0.01 for x in xs]
    return state


def _clone(state):
    return {name: [t.clone() for t in ts] for name, ts in state.items()}


def _run(op, state, kernels):
    """One call of `op` with `kernels` (torch.ops.dsd: the selected backend, without the
    public functions' host checks, which would synchronise; or torch_ref). Returns the new
    tensors it made."""
    if op == "select":
        xs = state["xs"]
        numels = [x.numel() for x in xs]
        halves = [n // 2 for n in numels]
        return [kernels.kth_smallest_abs(xs, sum(numels) // 3),
                kernels.kth_smallest_abs_per_tensor(xs, halves),
                *kernels.magnitude_masks(xs, halves, "layer"),
                *kernels.magnitude_masks(xs, [sum(numels) // 2], "global")]
    if op == "apply":
        kernels.apply_masks_(state["xs"], state["masks"])
    elif op == "sgd":
        kernels.masked_sgd_(state["params"], state["grads"], state["exp_avgs"], state["masks"],
                            0.1, 0.9, 0.0, 0.01, False, False, None)
    else:
        kernels.masked_adam_(state["params"], state["grads"], state["exp_avgs"],
                             state["exp_avg_sqs"], state["masks"], [3.0] * 3, 1e-2, 0.9, 0.999,
                             1e-8, 0.01, True, False, None)
    return []


def _assert_matches(got, expected, exact, what):
    for i, (g, e) in enumerate(zip(got, expected)):
        if exact or g.dtype == torch.bool:
            assert torch.equal(g.float().view(torch.int32), e.float().view(torch.int32)), \
                f"{what}: tensor {i} differs"
        else:
            torch.testing.assert_close(g, e, **TOLERANCES[g.dtype], msg=f"{what}: tensor {i}")


def _check(op, state, outputs, expected_state, expected_outputs, what):
    """Outputs (thresholds, masks) bit for bit; the tensors updated in place too, but those of
    an optimizer within the tolerance of their dtype."""
    _assert_matches(outputs, expected_outputs, True, what)
    for name, ts in state.items():
        _assert_matches(ts, expected_state[name], op in ("select", "apply"), f"{what}, {name}")


def _warm_up(op):
    """Compile every variant before a race: a first launch's compile outlasts the delay."""
    _run(op, _state(op, 99), torch.ops.dsd)
    torch.cuda.synchronize()


def test_thresholds_and_masks_read_on_a_second_stream_while_the_first_waits():
    """Fresh tables are uploaded on A behind the delay; B's calls must not read them."""
    _warm_up("select")
    state = _state("select", 0)
    expected = _run("select", state, torch_ref)
    torch.cuda.synchronize()
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for cached in ("fresh", "cached"):
        with torch.cuda.stream(a):
            torch.cuda._sleep(DELAY_CYCLES)
            on_a = _run("select", state, torch.ops.dsd)
        with torch.cuda.stream(b):
            on_b = _run("select", state, torch.ops.dsd)
        torch.cuda.synchronize()
        _assert_matches(on_a, expected, True, f"{cached} tables, stream A")
        _assert_matches(on_b, expected, True, f"{cached} tables, stream B")


@pytest.mark.parametrize("op", OPS)
def test_tables_evicted_on_one_stream_are_not_read_on_another(op):
    """Tables built on A; B, held back, calls twice on the same tensors (tables fresh, then
    cached); meanwhile A's calls on other tensors evict the tables, and their memory goes to
    A's new tables. B's calls must read tables of their own."""
    _warm_up(op)
    state, others = _state(op, 0), [_state(op, i + 1) for i in range(tables.Cache.SIZE + 1)]
    expected, expected_others = _clone(state), [_clone(other) for other in others]
    expected_outputs = sum((_run(op, expected, torch_ref) for _ in range(3)), [])
    expected_others_outputs = [_run(op, other, torch_ref) for other in expected_others]
    torch.cuda.synchronize()
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        outputs = _run(op, state, torch.ops.dsd)
    torch.cuda.synchronize()
    with torch.cuda.stream(b):
        torch.cuda._sleep(DELAY_CYCLES)
        outputs += _run(op, state, torch.ops.dsd) + _run(op, state, torch.ops.dsd)
    with torch.cuda.stream(a):
        others_outputs = [_run(op, other, torch.ops.dsd) for other in others]
    torch.cuda.synchronize()
    _check(op, state, outputs, expected, expected_outputs, "the tensors of A's tables, on B")
    for i, (other, expected_other) in enumerate(zip(others, expected_others)):
        _check(op, other, others_outputs[i], expected_other, expected_others_outputs[i],
               f"other tensors {i}, on A")
