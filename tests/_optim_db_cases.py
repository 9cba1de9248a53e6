"""The cases and oracles of the masked-optimizer tests over torch's own optimizer database
(`torch.testing._internal.common_optimizers.optim_db`) and a third-party optimizer.

Every expected value comes from torch.optim's (or lion-pytorch's) own steps, never from
dsd_kernels' tables: a wrong value there cannot hide in its own oracle.
"""

import copy
import io
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lion_pytorch import Lion
from torch.testing._internal.common_optimizers import (
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import dsd_kernels as dk

OPTIM = torch.optim
# How each optimizer of the database is masked (docs/training.md's table says the same):
# "fused" and "general" are element-wise and exact, "projected" keeps pruned weights at +0.0
# but has state not shaped like the parameter, "refused" cannot be masked.
PATHS = {
    OPTIM.SGD: "fused", OPTIM.Adam: "fused", OPTIM.AdamW: "fused",
    OPTIM.Adadelta: "general", OPTIM.Adagrad: "general", OPTIM.Adamax: "general",
    OPTIM.ASGD: "general", OPTIM.NAdam: "general", OPTIM.RAdam: "general",
    OPTIM.RMSprop: "general", OPTIM.Rprop: "general",
    OPTIM.Adafactor: "projected", OPTIM.Muon: "projected", OPTIM.LBFGS: "projected",
    OPTIM.SparseAdam: "refused",
}
# The masked steps docs/training.md names for each path (its table's second column): the
# fused three take the general step when a flag the kernels lack is on.
DOCUMENTED = {"fused": {"fused", "general, exact"}, "general": {"general, exact"},
              "projected": {"general, projected"}, "refused": {"refused"}}
# The one-line reason make_masked_ gives for a refused optimizer (a regex on its message).
REFUSALS = {OPTIM.SparseAdam: "sparse gradient"}
FUSED_CLASSES = {OPTIM.SGD: dk.MaskedSGD, OPTIM.Adam: dk.MaskedAdam,
                 OPTIM.AdamW: dk.MaskedAdamW}
# The fused kernels' op order differs from torch.optim's by a few fp32 roundings per step
# (tests/test_make_masked.py's bound over 30 steps); the general step is torch's own.
FUSED_TOLERANCE = dict(rtol=2e-5, atol=2e-6)


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: its class, constructor kwargs, and whether its step
    needs a closure."""

    cls: type
    kwargs: dict
    closure: bool = False

    def make(self, params):
        return self.cls(params, **copy.deepcopy(self.kwargs))


def _id(cls, index, desc):
    return f"{cls.__name__}-{index}-" + re.sub(r"[^A-Za-z0-9.]+", "_", desc).strip("_")


def db_cases(*paths):
    """pytest params of every optim_db configuration on CPU (with the database's foreach,
    fused and differentiable variants) whose optimizer is masked on one of `paths`."""
    out = []
    for info in optim_db:
        if PATHS[info.optim_cls] not in paths:
            continue
        inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
        for index, optim_input in enumerate(inputs):
            case = Case(info.optim_cls, optim_input.kwargs, info.step_requires_closure)
            out.append(pytest.param(case, id=_id(info.optim_cls, index, optim_input.desc)))
    return out


def one_case_per_optimizer(*paths):
    """For each optimizer on `paths`, its database configuration with the most settings."""
    out = []
    for info in optim_db:
        if PATHS[info.optim_cls] not in paths:
            continue
        inputs = info.optim_inputs_func("cpu", torch.float32)
        index, richest = max(enumerate(inputs), key=lambda item: len(item[1].kwargs))
        case = Case(info.optim_cls, richest.kwargs, info.step_requires_closure)
        out.append(pytest.param(case, id=_id(info.optim_cls, index, richest.desc)))
    return out


def db_case(cls, desc):
    """The pytest param of `cls`'s database configuration described `desc`."""
    info = next(info for info in optim_db if info.optim_cls is cls)
    inputs = info.optim_inputs_func("cpu", torch.float32)
    index = [optim_input.desc for optim_input in inputs].index(desc)
    case = Case(cls, inputs[index].kwargs, info.step_requires_closure)
    return pytest.param(case, id=_id(cls, index, desc))


LION_CASES = [
    pytest.param(Case(Lion, dict(lr=1e-2)), id="Lion"),
    pytest.param(Case(Lion, dict(lr=1e-2, weight_decay=0.5)), id="Lion-weight_decay"),
]


class _UserAdam(OPTIM.Adam):
    """A user's subclass of a torch.optim optimizer."""


class _UserRMSprop(OPTIM.RMSprop):
    """A user's subclass of a torch.optim optimizer."""


SUBCLASS_CASES = [
    pytest.param(Case(_UserAdam, dict(lr=1e-2, weight_decay=0.1)), id="Adam-subclass"),
    pytest.param(Case(_UserRMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
                 id="RMSprop-subclass"),
]


def db_error_cases():
    """pytest params (class, index of its error input) of every optim_db error input on CPU."""
    out = []
    for info in optim_db:
        for index, error in enumerate(info.optim_error_inputs_func("cpu", torch.float32)):
            desc = error.optimizer_error_input.desc
            out.append(pytest.param(info.optim_cls, index, id=_id(info.optim_cls, index, desc)))
    return out


def error_input(cls, index):
    """A fresh copy of the index-th error input of `cls` (its tensors made anew)."""
    info = next(info for info in optim_db if info.optim_cls is cls)
    return info.optim_error_inputs_func("cpu", torch.float32)[index]


def documented_paths(page: Path) -> dict:
    """{torch.optim class name: the set of masked steps its rows name} from the table of a
    docs page whose rows start with torch.optim class names ("SGD, Adam, AdamW with ..." |
    "general, exact" | ...); rows about other optimizers are left out."""
    paths: dict = {}
    for line in page.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2:
            continue
        names = [name.strip() for name in cells[0].split(" with ")[0].split(",")]
        if all(name[:1].isupper() and hasattr(OPTIM, name) for name in names):
            for name in names:
                paths.setdefault(name, set()).add(cells[1])
    return paths


# ---- parameters, masks and gradients -------------------------------------------------------

def shapes(case):
    """A 2-D and a 1-D parameter; Muon takes 2-D parameters only."""
    return [(5, 4), (3, 6)] if case.cls is OPTIM.Muon else [(5, 4), (7,)]


def initial(case, seed=0):
    """Fresh random weights and keep-masks (each with kept and pruned positions)."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) for s in shapes(case)]
    masks = []
    for s in shapes(case):
        mask = torch.rand(s, generator=gen) < 0.6
        mask.view(-1)[:2] = torch.tensor([True, False])
        masks.append(mask)
    return weights, masks


def as_params(case, weights):
    """Parameters holding `weights`: leaves, or (differentiable) non-leaf tensors, which a
    differentiable step updates in place."""
    leaves = [w.clone().requires_grad_() for w in weights]
    if case.kwargs.get("differentiable"):
        return [leaf.clone() for leaf in leaves]
    return leaves


def targets(case, step, seed=0):
    """The random numbers of one step, one tensor per parameter."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(s, generator=gen) for s in shapes(case)]


def with_pruned(grads, masks, pruned):
    """`grads` with `pruned` written at the pruned positions of `masks`."""
    return [g.masked_fill(~m, pruned) for g, m in zip(grads, masks)]


def take_step(case, opt, params, target, masks=None, pruned=None):
    """One step. Its gradients are `target` (with `pruned` at pruned positions, given masks);
    an optimizer that needs a closure gets one whose loss is 0.5 |p - target|^2, its
    gradient treated alike at every evaluation, which checks (given masks) that the pruned
    weights are 0 whenever the loss is evaluated."""
    def grads():
        values = target if not case.closure else [p.detach() - t for p, t in zip(params, target)]
        return values if masks is None else with_pruned(values, masks, pruned)

    if not case.closure:
        for p, g in zip(params, grads()):
            p.grad = g.clone()
        return opt.step()

    def closure():
        if masks is not None:  # a masked step evaluates the loss on the kept weights only
            for i, (p, m) in enumerate(zip(params, masks)):
                assert (p.detach()[~m] == 0).all(), f"the closure saw pruned weights of {i}"
        for p, g in zip(params, grads()):
            p.grad = g
        return sum(0.5 * ((p.detach() - t) ** 2).sum() for p, t in zip(params, target))

    return opt.step(closure)


def masked(case, weights, masks, dense_steps=0):
    """The case's optimizer on fresh parameters holding `weights`, made masked, and pruned
    by set_masks after `dense_steps` steps without masks (whose state it then resets)."""
    params = as_params(case, weights)
    made = case.make(params)
    opt = dk.optim.make_masked_(made)
    assert opt is made and isinstance(opt, case.cls)
    for step in range(dense_steps):
        take_step(case, opt, params, targets(case, step, seed=1))
    opt.set_masks(dict(zip(params, masks)))
    return opt, params


# ---- checks ---------------------------------------------------------------------------------

def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same(a, b):
    """Bit for bit: tensors, lists of them (LBFGS's history) or plain values."""
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
            torch.equal(bits(a.detach()), bits(b.detach()))
    return a == b


def close(a, b, fused):
    """Bit for bit; floating-point tensors of the fused kernels within their tolerance."""
    if not fused:
        assert same(a, b)
    elif isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0:
        torch.testing.assert_close(a.detach(), b.detach(), **FUSED_TOLERANCE)
    else:
        assert same(a, b)


def runs_fused(opt) -> bool:
    return type(opt) in FUSED_CLASSES.values()


def assert_pruned_zero(params, masks):
    """Pruned weights exactly +0.0 (the sign bit too)."""
    for i, (p, m) in enumerate(zip(params, masks)):
        pruned = p.detach()[~m]
        assert (pruned == 0).all() and not torch.signbit(pruned).any(), f"parameter {i}"


def parameter_shaped(opt, p):
    return {name: t for name, t in opt.state.get(p, {}).items()
            if isinstance(t, torch.Tensor) and t.shape == p.shape}


def zero_step_state(case, shape):
    """The parameter-shaped state of a fresh unmasked optimizer of the case (one parameter of
    `shape`, a 0 weight) after one step on a 0 gradient: what a position that has only ever
    seen 0 weights and 0 gradients holds, from torch's (or the library's) own step."""
    params = as_params(case, [torch.zeros(shape)])
    opt = case.make(params)
    take_step(case, opt, params, [torch.zeros(shape)])
    return parameter_shaped(opt, params[0])


def assert_fresh_at_pruned(case, opt, params, masks):
    """Every parameter-shaped state tensor holds a fresh state's value at pruned positions
    (compared as numbers: the sign of a zero in the state changes no later step)."""
    for i, (p, m) in enumerate(zip(params, masks)):
        fresh = zero_step_state(case, p.shape)
        for name, t in parameter_shaped(opt, p).items():
            assert name in fresh, f"parameter {i}: state {name!r} that a fresh step does not make"
            assert torch.equal(t.detach()[~m], fresh[name].detach()[~m]), \
                f"parameter {i}, state {name!r}"


def assert_kept_equal(opt, params, ref, ref_params, masks, fused):
    """Weights and state of `opt` equal `ref`'s at kept positions (parameter-shaped) and
    everywhere (other state): bit for bit, or within the fused kernels' tolerance."""
    for i, (p, r, m) in enumerate(zip(params, ref_params, masks)):
        close(p[m], r[m], fused)
        state, ref_state = opt.state.get(p, {}), ref.state.get(r, {})
        assert state.keys() == ref_state.keys(), f"parameter {i}"
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                close(value[m], ref_state[name][m], fused)
            else:
                close(value, ref_state[name], fused)


def assert_identical(opt_a, params_a, opt_b, params_b):
    """Weights and every state entry equal bit for bit at every position."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert same(a, b), f"parameter {i}"
        state_a, state_b = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert state_a.keys() == state_b.keys(), f"parameter {i}"
        for name in state_a:
            assert same(state_a[name], state_b[name]), f"parameter {i}, state {name!r}"


def snapshot(opt, params):
    """Copies of `opt` (its state only) and of `params`, for assert_identical."""
    copies = [p.detach().clone() for p in params]
    state = {c: {name: value.clone() if isinstance(value, torch.Tensor) else value
                 for name, value in opt.state.get(p, {}).items()}
             for c, p in zip(copies, params)}
    return SimpleNamespace(state=state), copies


def assert_finite(opt, params):
    for i, p in enumerate(params):
        assert torch.isfinite(p.detach()).all(), f"parameter {i}"
        for name, value in opt.state.get(p, {}).items():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    assert torch.isfinite(t).all(), f"parameter {i}, state {name!r}"


def unmasked_copy(case, opt, params):
    """The case's unmasked optimizer on copies of `params`, started from `opt`'s state."""
    copies = as_params(case, [p.detach() for p in params])
    ref = case.make(copies)
    state_dict = _detached_copy(opt.state_dict())
    state_dict.pop("masks", None)
    ref.load_state_dict(state_dict)
    return ref, copies


def _detached_copy(value):
    """A deep copy; tensors detached (a differentiable step's state carries autograd graphs,
    which deepcopy refuses)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached_copy(v) for v in value)
    return copy.deepcopy(value)


def through_bytes(obj):
    """`obj` saved with torch.save and loaded back, as a checkpoint file would be."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: on a busy machine every op of a thread pool waits for its threads (a test
    module that imports this fixture runs on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
