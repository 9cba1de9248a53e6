"""make_masked_ on any torch.optim.Optimizer: subclasses, other libraries' optimizers and the
flags the fused step lacks get the general masked step, exact for element-wise optimizers;
Adafactor, Muon and LBFGS are projected (docs/design.md, The general masked step)."""

import copy
import pickle

import pytest
import torch
from lion_pytorch import Lion
from torch import optim

import dsd_kernels as dk
from dsd_kernels.optim import LR_SCALE, fresh, general, make_masked_

from _oracle import assert_same_state, same_bits

SHAPES = [(6, 5), (11,)]


class _StepCountingSGD(optim.SGD):
    """A subclass overriding step (so it cannot take the fused path)."""

    steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


class _MyRprop(optim.Rprop):
    pass


class _MyAdamax(optim.Adamax):
    pass


# Element-wise: (make, whether the step needs non-leaf parameters: differentiable)
ELEMENTWISE = {
    "Lion": (lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1), False),
    "Lion decoupled": (lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1,
                                       decoupled_weight_decay=True), False),
    "Adam amsgrad": (lambda ps: optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.01), False),
    "AdamW amsgrad maximize": (lambda ps: optim.AdamW(ps, lr=1e-2, amsgrad=True,
                                                      maximize=True), False),
    "Adam fused amsgrad": (lambda ps: optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True), False),
    "Adam differentiable": (lambda ps: optim.Adam(ps, lr=1e-2, differentiable=True), True),
    "SGD subclass": (lambda ps: _StepCountingSGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                 maximize=True), False),
    "SGD differentiable": (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1,
                                                differentiable=True), True),
    "Rprop subclass": (lambda ps: _MyRprop(ps, lr=0.02, maximize=True), False),
    "Adamax subclass": (lambda ps: _MyAdamax(ps, lr=0.02, weight_decay=0.01), False),
}








def _plus_zero(params, masks):
    for p, m in zip(params, masks):
        pruned = p.detach()[~m]
        assert (pruned == 0).all() and not torch.signbit(pruned).any()


def _leaves(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    masks = [torch.rand(s, generator=gen) < 0.6 for s in SHAPES]
    return [p.masked_fill(~m, 0.0) for p, m in zip(params, masks)], masks


def _as_params(values, tracked):
    params = [v.clone().requires_grad_() for v in values]
    return [p.clone() for p in params] if tracked else params  # non-leaf: differentiable


def _grads(params, masks, seed, pruned=None):
    gen = torch.Generator().manual_seed(100 + seed)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    return grads if pruned is None else [g.masked_fill(~m, pruned)
                                         for g, m in zip(grads, masks)]


@pytest.mark.parametrize("config", ELEMENTWISE)
def test_elementwise_masked_step_is_the_step_on_zeroed_gradients(config):
    """At every position, bit for bit: the unmasked step on gradients zeroed at pruned
    positions; NaN or finite gradients there leave no trace; after clear_masks the pruned
    weights regrow exactly as the reference's (their state is what it holds there)."""
    make, tracked = ELEMENTWISE[config]
    values, masks = _leaves()
    runs = []
    for _ in range(2):
        ps = _as_params(values, tracked)
        opt = make(ps)
        kind = type(opt)
        assert make_masked_(opt) is opt and isinstance(opt, kind)
        assert type(opt).__bases__ == (general._MaskedGeneral, kind)
        opt.set_masks(dict(zip(ps, masks)))
        runs.append((opt, ps))
    ref_params = _as_params(values, tracked)
    ref = make(ref_params)
    for step in range(3):
        for (opt, ps), fill in zip(runs, (float("nan"), 3.0)):
            for p, g in zip(ps, _grads(ps, masks, step, fill)):
                p.grad = g
            opt.step()
            _plus_zero(ps, masks)
        for p, g in zip(ref_params, _grads(ref_params, masks, step, 0.0)):
            p.grad = g
        ref.step()
        for opt, ps in runs:
            assert_same_state(opt, ps, ref, ref_params)
    opt, ps = runs[0]
    opt.clear_masks()
    for step in range(3, 5):
        for params in (ps, ref_params):
            for p, g in zip(params, _grads(params, masks, step)):
                p.grad = g
        opt.step()
        ref.step()
        assert_same_state(opt, ps, ref, ref_params)
    assert all((p.detach()[~m] != 0).all() for p, m in zip(ps, masks))


PROBED = [
    (optim.SGD, dict(lr=0.1)), (optim.SGD, dict(lr=0.1, momentum=0.9, maximize=True)),
    (optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)), (optim.AdamW, dict(lr=1e-2)),
    (optim.Adadelta, dict(lr=0.5, weight_decay=0.1)), (optim.Adafactor, dict(lr=1e-2)),
    (optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.25)),
    (optim.Adamax, dict(lr=1e-2, eps=1e-3, maximize=True)), (optim.ASGD, dict(lr=0.1, t0=1)),
    (optim.LBFGS, dict(lr=1.0)), (optim.Muon, dict(lr=1e-2)),
    (optim.NAdam, dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1)),
    (optim.RAdam, dict(lr=1e-2)),
    (optim.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True, maximize=True)),
    (optim.Rprop, dict(lr=0.02)), (optim.Rprop, dict(lr=100.0, maximize=True)),
    (optim.Rprop, dict(lr=1e-9, step_sizes=(1e-6, 1.0))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls, kwargs", PROBED, ids=lambda v: getattr(v, "__name__", ""))
def test_the_probe_finds_the_table_of_torch_optim(cls, kwargs, dtype):
    """fresh.FRESH_STATE, the documented values, is what the probe finds for each class."""
    assert {c for c, _ in PROBED} == set(fresh.FRESH_STATE)
    for ndim in (1, 2) if cls is not optim.Muon else (2,):
        x = torch.zeros(SHAPES[0][:ndim], dtype=dtype, requires_grad=True)
        opt = cls([x], **kwargs)
        hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        found = fresh.probe(cls, hyper, opt.defaults, ndim, dtype, x.device)
        table = fresh.fresh_values(cls, hyper, opt.defaults, ndim, dtype, x.device)
        assert set(found) <= set(table)
        for name, value in found.items():  # as filled: rounded to the state's dtype
            want = torch.tensor(table[name], dtype=dtype)
            assert same_bits(torch.tensor(value, dtype=dtype), want), (name, value, table[name])


def test_a_schedule_probes_again_at_each_lr():
    """A subclass's fresh step size follows the lr an LR schedule sets (a probe per lr)."""
    values, masks = _leaves(1)
    ps = _as_params(values, False)
    opt = _MyRprop(ps, lr=0.02)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    make_masked_(opt).set_masks(dict(zip(ps, masks)))
    opt.param_groups[0][LR_SCALE] = 0.5
    for step in range(3):
        for p, g in zip(ps, _grads(ps, masks, step)):
            p.grad = g
        opt.step()
        lr = 0.02 * 0.5 ** step * 0.5
        for p, m in zip(ps, masks):
            assert (opt.state[p]["step_size"][~m] == torch.tensor(lr)).all()
        sched.step()


@pytest.mark.parametrize("make", [
    lambda ps: optim.Adafactor(ps, lr=1e-2),
    lambda ps: optim.Muon(ps[:1], lr=1e-2),
    lambda ps: optim.LBFGS(ps, lr=0.5, max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
])
def test_projected_optimizers_keep_pruned_weights_zero(make):
    """Adafactor's factored moments, Muon's orthogonalised update, LBFGS's flat history: the
    optimizer sees zero gradients at pruned positions and pruned weights are +0.0 after every
    step; nothing depends on the gradients at pruned positions."""
    values, masks = _leaves(2)
    targets = [torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for v in values]
    runs = []
    for fill in (float("nan"), 3.0):
        ps = _as_params(values, False)
        opt = make_masked_(make(ps))
        ps = opt.param_groups[0]["params"]  # Muon: the matrix only
        opt.set_masks(dict(zip(ps, masks)))

        def closure(ps=ps, opt=opt, fill=fill):
            opt.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, targets))
            loss.backward()
            for p, m in zip(ps, masks):
                p.grad.masked_fill_(~m, fill)
            return loss

        for _ in range(3):
            opt.step(closure)
            _plus_zero(ps, masks[:len(ps)])
            assert all(torch.isfinite(p).all() for p in ps)
        runs.append((opt, ps))
    assert_same_state(*runs[0], *runs[1])


def test_lbfgs_is_lbfgs_on_the_kept_weights():
    """Every vector of LBFGS's history is 0 at pruned positions, so the masked step is LBFGS
    with a closure zeroing the pruned gradients, bit for bit."""
    values, masks = _leaves(3)
    targets = [torch.randn(v.shape, generator=torch.Generator().manual_seed(8)) for v in values]
    results = []
    for masked in (True, False):
        ps = _as_params(values, False)
        opt = optim.LBFGS(ps, lr=0.5, max_iter=5, history_size=3)
        if masked:
            make_masked_(opt).set_masks(dict(zip(ps, masks)))

        def closure(ps=ps, opt=opt, masked=masked):
            opt.zero_grad()
            loss = sum(((p - t) ** 2 * (1 + p.abs())).sum() for p, t in zip(ps, targets))
            loss.backward()
            for p, m in zip(ps, masks):
                p.grad.masked_fill_(~m, float("nan") if masked else 0.0)
            return loss

        for _ in range(2):
            opt.step(closure)
        results.append(ps)
    assert all(same_bits(a.detach(), b.detach()) for a, b in zip(*results))


def test_one_pass_per_device_each_way(monkeypatch):
    """Gradients masked in one call, weights and state filled in one call, per step; with a
    closure, the gradients once per evaluation; torch.optim's element-wise classes only the
    fill, their gradients left as they were."""
    calls = []
    for name in ("apply_masks_", "fill_pruned_"):
        real = getattr(general, name)
        monkeypatch.setattr(general, name, lambda *a, real=real, name=name: (calls.append(name),
                                                                            real(*a)))
    values, masks = _leaves(4)
    ps = _as_params(values, False)
    opt = make_masked_(Lion(ps, lr=1e-2))
    opt.set_masks(dict(zip(ps, masks)))
    assert calls == ["fill_pruned_"]
    for p, g in zip(ps, _grads(ps, masks, 0)):
        p.grad = g
    calls.clear()
    opt.step()
    assert calls == ["apply_masks_", "fill_pruned_"]
    evaluations = []

    def closure():
        evaluations.append(1)
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in ps)
        loss.backward()
        return loss

    rmsprop = make_masked_(optim.RMSprop(ps, lr=1e-2))  # element-wise: the fill is enough
    rmsprop.set_masks(dict(zip(ps, masks)))
    grads = [p.grad.clone() for p in ps]
    calls.clear()
    rmsprop.step()
    assert calls == ["fill_pruned_"]
    assert all(same_bits(p.grad, g) for p, g in zip(ps, grads))
    lbfgs = make_masked_(optim.LBFGS(ps, lr=0.1, max_iter=3))
    lbfgs.set_masks(dict(zip(ps, masks)))
    calls.clear()
    lbfgs.step(closure)
    assert len(evaluations) > 1
    assert calls == ["apply_masks_"] * len(evaluations) + ["fill_pruned_"]


def _masked_optimizers():
    return {
        "MaskedSGD": lambda ps: dk.MaskedSGD(ps, lr=0.1, momentum=0.9),
        "MaskedAdam": lambda ps: dk.MaskedAdam(ps, lr=1e-2),
        "MaskedAdamW": lambda ps: dk.MaskedAdamW(ps, lr=1e-2),
        "Rprop": lambda ps: make_masked_(optim.Rprop(ps, lr=0.02)),
        "Adam amsgrad": lambda ps: make_masked_(optim.Adam(ps, lr=1e-2, amsgrad=True)),
        "SGD subclass": lambda ps: make_masked_(_StepCountingSGD(ps, lr=0.1, momentum=0.9)),
    }


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(_masked_optimizers()))
def test_masks_survive_pickle_and_deepcopy(name, copier):
    values, masks = _leaves(5)
    ps = _as_params(values, False)
    opt = _masked_optimizers()[name](ps)
    opt.set_masks(dict(zip(ps, masks)))
    for p, g in zip(ps, _grads(ps, masks, 0)):
        p.grad = g
    opt.step()
    other = copier(opt)
    assert type(other) is type(opt)
    copies = other.param_groups[0]["params"]
    assert list(other.masks) == copies and all(other.masks[c] is not None for c in copies)
    assert all(torch.equal(other.masks[c], m) for c, m in zip(copies, masks))
    assert_same_state(other, copies, opt, ps)
    for params, o in ((ps, opt), (copies, other)):
        for p, g in zip(params, _grads(params, masks, 1, float("nan"))):
            p.grad = g
        o.step()
    assert_same_state(other, copies, opt, ps)
    _plus_zero(copies, masks)
    saved = other.state_dict()
    assert all(torch.equal(saved["masks"][i], m) for i, m in enumerate(masks))


@pytest.mark.parametrize("config", ["Lion", "Adam amsgrad", "Adam fused amsgrad",
                                    "Rprop subclass"])
def test_grad_scaler_skips_an_inf_step_and_unscales(config):
    """GradScaler unscales the gradients itself (torch's fused Adam: inside its step); a step
    with an inf is skipped whole, leaving pruned weights +0.0 and the state as the unmasked
    reference's."""
    make, _ = ELEMENTWISE[config]
    values, masks = _leaves(6)
    ps, ref_params = _as_params(values, False), _as_params(values, False)
    opt, ref = make_masked_(make(ps)), make(ref_params)
    opt.set_masks(dict(zip(ps, masks)))
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0) for _ in range(2)]
    for step in range(4):
        for params, o, scaler, fill in ((ps, opt, scalers[0], 5.0),
                                        (ref_params, ref, scalers[1], 0.0)):
            scale = scaler.scale(torch.ones(())).item()
            for p, g in zip(params, _grads(params, masks, step, fill)):
                p.grad = g * scale
            if step == 2:
                params[1].grad[masks[1].nonzero()[0]] = float("inf")
            scaler.step(o)
            scaler.update()
        assert_same_state(opt, ps, ref, ref_params)
        _plus_zero(ps, masks)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 8.0


def test_a_third_party_step_held_from_before_refuses():
    values, masks = _leaves(7)
    ps = _as_params(values, False)
    opt = Lion(ps, lr=1e-2)
    stale = opt.step
    make_masked_(opt).set_masks(dict(zip(ps, masks)))
    for p, g in zip(ps, _grads(ps, masks, 0)):
        p.grad = g
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="unmasked step was called on a masked optimizer"):
        stale()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before)) and not opt.state
    opt.step()
    _plus_zero(ps, masks)


def test_an_lr_the_optimizer_sets_itself_cannot_be_scaled():
    values, masks = _leaves(8)
    ps = _as_params(values, False)

    class SelfScaled(Lion):  # lr=None: a step size it computes itself, as Adafactor's
        def step(self, closure=None):
            for group in self.param_groups:
                group["lr"], lr = 1e-3, group["lr"]
            try:
                return super().step(closure)
            finally:
                for group in self.param_groups:
                    group["lr"] = lr

    opt = make_masked_(SelfScaled(ps, lr=1e-2))
    opt.param_groups[0]["lr"] = None
    opt.set_masks(dict(zip(ps, masks)))
    opt.param_groups[0][LR_SCALE] = 0.1
    for p, g in zip(ps, _grads(ps, masks, 0)):
        p.grad = g
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"^param group 0 has lr=None, which dsd_lr_scale=0.1 "
                                         "cannot scale"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))


@pytest.mark.slow
def test_transformers_adafactor_is_projected():
    transformers = pytest.importorskip("transformers.optimization")
    values, masks = _leaves(9)
    runs = []
    for fill in (float("nan"), 3.0):
        ps = _as_params(values, False)
        opt = make_masked_(transformers.Adafactor(ps, lr=None, relative_step=True,
                                                  warmup_init=True, beta1=0.9))
        opt.set_masks(dict(zip(ps, masks)))
        for step in range(3):
            for p, g in zip(ps, _grads(ps, masks, step, fill)):
                p.grad = g
            opt.step()
            _plus_zero(ps, masks)
        runs.append((opt, ps))
    assert_same_state(*runs[0], *runs[1])
    assert all((runs[0][0].state[p]["exp_avg"][~m] == 0).all() for p, m in zip(runs[0][1], masks))


def test_a_refused_step_changes_nothing():
    """A sparse gradient, or a parameter moved away from its mask (without a gradient too):
    one-line errors before anything is updated."""
    values, masks = _leaves(10)
    ps = _as_params(values, False)
    opt = make_masked_(Lion(ps, lr=1e-2))
    opt.set_masks(dict(zip(ps, masks)))
    ps[0].grad = torch.randn(ps[0].shape).to_sparse()
    ps[1].grad = torch.randn(ps[1].shape)
    with pytest.raises(ValueError, match=r"^param group 0, parameter 0 has a sparse gradient"):
        opt.step()
    assert torch.equal(ps[0].detach(), values[0]) and not opt.state
    ps[0].grad = None
    opt._masks = {**opt._masks, ps[0]: masks[0].to("meta")}  # as if the parameter had moved
    grad = ps[1].grad.clone()
    with pytest.raises(ValueError, match=r"^the mask of param group 0, parameter 0 is on meta "
                                         "but the parameter moved to cpu"):
        opt.step()
    assert torch.equal(ps[1].detach(), values[1]) and not opt.state
    assert torch.equal(ps[1].grad, grad)  # not masked either
