"""make_masked_: a torch.optim SGD/Adam/AdamW becomes its masked class as the same object, so
everything that already holds it (LR schedulers, GradScaler, the user's own variable, step
hooks) drives the masked step; the LR scale composes with any scheduler."""

import copy
import warnings

import pytest
import torch
from torch import nn

import dsd_kernels as dk
from dsd import DSD, Plan
from dsd_kernels.optim import LR_SCALE, make_masked_, step_lr

TORCH_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dk.MaskedSGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                               weight_decay=1e-2)),
    "adam": (torch.optim.Adam, dk.MaskedAdam, dict(lr=1e-2, betas=(0.8, 0.95),
                                                   weight_decay=1e-2)),
    "adam_decoupled": (torch.optim.Adam, dk.MaskedAdam, dict(lr=1e-2, weight_decay=0.1,
                                                             decoupled_weight_decay=True)),
    "adamw": (torch.optim.AdamW, dk.MaskedAdamW, dict(lr=1e-2, weight_decay=0.1)),
}
# 30 steps within a few fp32 roundings of torch.optim's op order per step.
TRAJECTORY = dict(rtol=2e-5, atol=2e-6)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in [(9, 7), (5,)]]


def _fill_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) + 0.5 * p.detach()


def _state_tensors(opt, p):
    return [v for k, v in opt.state[p].items() if k != "step"]


@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
def test_same_object_same_groups_and_state_then_torch_math(name):
    torch_cls, masked_cls, kwargs = TORCH_OPTIMIZERS[name]
    ours, theirs = _params(), _params()
    opt, ref = torch_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(3):  # torch.optim's own steps create the state
        for params, o in ((ours, opt), (theirs, ref)):
            _fill_grads(params, step)
            o.step()
    groups, state = opt.param_groups, opt.state
    assert make_masked_(opt) is opt
    assert type(opt) is masked_cls and isinstance(opt, torch_cls)
    assert opt.param_groups is groups and opt.state is state and opt.masks == {}
    assert make_masked_(opt) is opt  # already masked: as it is
    for step in range(3, 30):  # without masks the converted object follows torch.optim
        for params, o in ((ours, opt), (theirs, ref)):
            _fill_grads(params, step)
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TRAJECTORY)
        for x, y in zip(_state_tensors(opt, a), _state_tensors(ref, b)):
            torch.testing.assert_close(x, y, **TRAJECTORY)
    mask = torch.rand(ours[0].shape, generator=torch.Generator().manual_seed(1)) < 0.5
    opt.set_masks({ours[0]: mask})
    for step in range(30, 35):
        _fill_grads(ours, step)
        opt.step()
        assert (ours[0][~mask] == 0).all()
        assert all((t[~mask] == 0).all() for t in _state_tensors(opt, ours[0]))
    assert 0 in opt.state_dict()["masks"]


def test_step_lr_scheduler_created_before_dsd():
    """The reported case: StepLR made before DSD halves the LR of the optimizer DSD steps, and
    re-dense's factor multiplies the scheduled rate."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    dsd = DSD(model, opt, Plan.dsd(2, 2, 2, redense_lr_factor=0.1))
    assert dsd.optimizer is opt
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for epoch in range(6):
            dsd.epoch_start(epoch)
            before = model.weight.detach().clone()
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).sum().backward()
            grad, buffer = model.weight.grad.clone(), opt.state.get(model.weight, {})
            momentum = buffer["momentum_buffer"].clone() if buffer else None
            opt.step()
            # SGD: the step moved the weight by -lr_used * (0.9 * buffer + grad)
            direction = grad if momentum is None else 0.9 * momentum + grad
            kept = opt.masks.get(model.weight, torch.ones_like(direction, dtype=torch.bool))
            used.append(((before - model.weight.detach())[kept] / direction[kept]).mean().item())
            sched.step()
    expected = [0.1 * 0.5 ** epoch * (0.1 if epoch >= 4 else 1.0) for epoch in range(6)]
    assert used == pytest.approx(expected, rel=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 6)  # the scheduler owns lr
    assert step_lr(opt.param_groups[0]) == pytest.approx(0.1 * 0.5 ** 6 * 0.1)


def test_absolute_scheduler_composes_with_the_lr_scale():
    """LambdaLR sets lr = base * f(step) every step (the Hugging Face Trainer's schedules):
    the scale still multiplies it."""
    params = _params()
    opt = torch.optim.SGD(params, lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    make_masked_(opt)
    opt.param_groups[0][LR_SCALE] = 0.25
    for step in range(4):
        before = params[0].detach().clone()
        _fill_grads(params, step)
        opt.step()
        torch.testing.assert_close(params[0].detach(),
                                   before - 0.2 / (1 + step) * 0.25 * params[0].grad)
        sched.step()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_grad_scaler_and_user_reference_made_before(name):
    torch_cls, _, kwargs = TORCH_OPTIMIZERS[name]
    params = _params()
    opt = torch_cls(params, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    mine = opt  # the user's own reference
    mask = torch.rand(params[0].shape, generator=torch.Generator().manual_seed(2)) < 0.5
    make_masked_(opt).set_masks({params[0]: mask})
    for step in range(5):
        mine.zero_grad()
        scaler.scale(sum((p * p).sum() for p in params)).backward()
        if step == 3:
            params[1].grad[0] = float("inf")
        before = [p.detach().clone() for p in params]
        scaler.step(mine)
        scaler.update()
        moved = not torch.equal(before[1], params[1])
        assert moved == (step != 3)  # the inf step is skipped, the others update
        assert (params[0][~mask] == 0).all()
        assert all((t[~mask] == 0).all() for t in _state_tensors(opt, params[0]))


def test_step_hooks_registered_before_still_run():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", type(o))))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", type(o))))
    make_masked_(opt)
    _fill_grads(params, 0)
    opt.step()
    assert calls == [("pre", dk.MaskedAdam), ("post", dk.MaskedAdam)]


def test_a_stale_step_method_is_refused_without_updating():
    """A bound step taken before the conversion would run torch's unmasked update: it raises
    instead, with the weights and state untouched."""
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    stale = opt.step
    make_masked_(opt).set_masks({params[0]: torch.zeros(params[0].shape, dtype=torch.bool)})
    _fill_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="before make_masked_"):
        stale()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    opt.step()  # the object itself steps, masked
    assert (params[0] == 0).all()


class _RandomStart(torch.optim.SGD):
    """A momentum buffer that starts random: no fresh value to reset pruned positions to."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("momentum_buffer", torch.rand_like(p))
        return super().step(closure)


class _Failing(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        raise NotImplementedError("no step here\nsecond line")


@pytest.mark.parametrize("make, error, message", [
    (lambda ps: torch.optim.SparseAdam(ps), TypeError,
     r"^cannot mask torch.optim.sparse_adam.SparseAdam: it takes sparse gradients"),
    (lambda ps: _RandomStart(ps, lr=0.1, momentum=0.9), ValueError,
     r"^cannot mask .*_RandomStart: its state 'momentum_buffer' at a weight that only ever "
     "sees 0 is not one value"),
    (lambda ps: _Failing(ps), ValueError,
     r"^cannot mask .*_Failing: finding its fresh state \(a fresh _Failing stepping a zero "
     r"parameter with zero gradients\) raised NotImplementedError: no step here$"),
])
def test_refused_optimizers_are_left_as_they_were(make, error, message):
    params = _params()
    opt = make(params)
    kind, before = type(opt), copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=message):
        make_masked_(opt)
    assert type(opt) is kind and not hasattr(opt, "_masks")
    assert opt.state_dict() == before and not opt._optimizer_step_pre_hooks


def test_not_an_optimizer_is_refused():
    with pytest.raises(TypeError, match="^cannot mask builtins.object: not a torch.optim"):
        make_masked_(object())


def test_unsupported_dtypes_are_refused_at_conversion_with_the_optimizer_unchanged():
    """A float64 parameter: one ValueError naming it, raised by make_masked_ itself (not by a
    later step), with the same class, param groups and state as before."""
    good = torch.nn.Parameter(torch.randn(4))
    bad = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [good]}, {"params": [good.new_zeros(2), bad]}], lr=0.1,
                          momentum=0.9)
    good.grad, bad.grad = torch.randn_like(good), torch.randn_like(bad)
    opt.step()
    groups, state = [dict(g) for g in opt.param_groups], dict(opt.state)
    buffers = {p: s["momentum_buffer"] for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=r"^param group 1, parameter 1 has dtype torch.float64; "
                                         "the masked optimizers support float32, float16 and "
                                         "bfloat16$"):
        make_masked_(opt)
    assert type(opt) is torch.optim.SGD and not hasattr(opt, "_masks")
    assert opt.param_groups == groups and dict(opt.state) == state
    assert all(opt.state[p]["momentum_buffer"] is b for p, b in buffers.items())


@pytest.mark.parametrize("masked_cls", [dk.MaskedSGD, dk.MaskedAdam, dk.MaskedAdamW])
def test_masked_constructors_refuse_unsupported_dtypes(masked_cls):
    model = torch.nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=r"param group 0, parameter 0 has dtype torch.float64"):
        masked_cls(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param group 0, parameter 1 \('bias'\) has dtype "
                                         "torch.float64"):
        masked_cls([("weight", torch.zeros(2, requires_grad=True)), ("bias", model.bias)],
                   lr=0.1)
    with pytest.raises(ValueError, match=r"param group 1, parameter 0 has dtype torch.int64"):
        masked_cls([{"params": [torch.zeros(2, requires_grad=True)]},
                    {"params": torch.zeros(2, dtype=torch.int64)}], lr=0.1)


def test_add_param_group_refuses_unsupported_dtypes_unchanged():
    params = _params()
    opt = dk.MaskedAdam(params, lr=0.1)
    groups = list(opt.param_groups)
    bad = (p for p in [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2).double())])
    with pytest.raises(ValueError, match=r"param group 1, parameter 1 has dtype torch.float64"):
        opt.add_param_group({"params": bad})
    assert opt.param_groups == groups
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.zeros(2))])})
    assert len(opt.param_groups) == 2 and len(opt.param_groups[1]["params"]) == 1


def test_dsd_on_a_float64_model_refuses_at_conversion():
    """The reported case: DSD(model.double(), SGD(...), plan) converted the optimizer, then its
    first step raised. Now the conversion refuses, and the optimizer stays torch's SGD."""
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0 has dtype torch.float64"):
        DSD(model, opt, Plan.dsd(2, 2, 2))
    assert type(opt) is torch.optim.SGD and not opt.state
    assert all(LR_SCALE not in group for group in opt.param_groups)


def _tracked(params):
    """Parameters a differentiable step may update in place: non-leaf tensors."""
    return [p.detach().clone().requires_grad_().clone() for p in params]


@pytest.mark.parametrize("make, tracked", [
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), False),
    (lambda ps: torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:], "amsgrad": True}],
                                  lr=1e-2, weight_decay=0.1), False),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, differentiable=True), True),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, differentiable=True), True),
])
def test_flags_the_fused_step_lacks_take_the_general_step(make, tracked):
    """amsgrad, capturable, differentiable: the general masked step of the same torch class,
    bit for bit torch's step on gradients zeroed at pruned positions."""
    params = _tracked(_params()) if tracked else _params()
    opt = make(params)
    kind = type(opt)
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.5
             for i, p in enumerate(params)]
    make_masked_(opt).set_masks(dict(zip(params, masks)))
    assert type(opt).__mro__[-3] is not dk.MaskedAdam and type(opt).__bases__[1] is kind
    ref_params = _tracked(params) if tracked else [p.detach().clone().requires_grad_()
                                                   for p in params]
    ref = make(ref_params)
    for step in range(3):
        _fill_grads(params, step)
        for p, r, m in zip(params, ref_params, masks):
            r.grad = p.grad.masked_fill(~m, 0.0)
        opt.step()
        ref.step()
        for p, r, m in zip(params, ref_params, masks):
            assert torch.equal(p.detach(), r.detach().masked_fill(~m, 0.0))
            for name, value in opt.state[p].items():
                want = ref.state[r][name]
                assert torch.equal(value, want if value.shape != p.shape
                                   else want.masked_fill(~m, 0.0)), name


@pytest.mark.parametrize("masked_cls, flag", [(dk.MaskedAdam, "amsgrad"),
                                              (dk.MaskedAdamW, "capturable"),
                                              (dk.MaskedSGD, "differentiable")])
def test_fused_classes_refuse_their_missing_flags_pointing_at_make_masked(masked_cls, flag):
    torch_name = masked_cls.__name__.removeprefix("Masked")
    message = (rf"^param group 0 uses {flag}=True, which the masked optimizers do not implement "
               rf"in their fused step \({masked_cls.__name__}\): build torch.optim.{torch_name}"
               rf"\(\.\.\., {flag}=True\) and call dsd_kernels.optim.make_masked_ on it for "
               "the general masked step$")
    with pytest.raises(ValueError, match=message):
        masked_cls(_params(), lr=0.1, **{flag: True})
    opt = masked_cls(_params(), lr=0.1)
    groups = list(opt.param_groups)
    with pytest.raises(ValueError, match=f"^param group 1 uses {flag}=True"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], flag: True})
    assert opt.param_groups == groups
