"""Masked optimizers on every backend: against torch.optim, and exact zeros where pruned.

torch.optim is the oracle. With all-True masks a masked optimizer must follow torch.optim;
with random masks, pruned weights and state must stay exactly 0 while kept weights follow a
torch.optim run whose gradients are masked (and whose pruned weights start at 0: then
torch's own state stays 0 at pruned positions, so the two runs must agree everywhere).
"""

import copy
import io

import pytest
import torch
from conftest import DTYPES, TOLERANCES

import dsd_kernels as dk
from dsd_kernels import host

from _backends import per_backend

SHAPES = [(33, 17), (7,), (4, 3, 5), (1,)]
STEPS = 100
# 100 steps, each within a few fp32 roundings of torch.optim's own op order (lerp vs
# mul+add, a*b/c vs a/c*b): 100 * 4 ulp ~ 5e-5 relative, on values of order 1.
TRAJECTORY = dict(rtol=5e-5, atol=5e-6)

OPTIMIZERS = {
    "sgd": (dk.MaskedSGD, torch.optim.SGD,
            dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "sgd_nesterov": (dk.MaskedSGD, torch.optim.SGD,
                     dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3, maximize=True)),
    "sgd_plain": (dk.MaskedSGD, torch.optim.SGD, dict(lr=0.1)),
    "adam": (dk.MaskedAdam, torch.optim.Adam,
             dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-2)),
    "adam_maximize": (dk.MaskedAdam, torch.optim.Adam, dict(lr=1e-2, maximize=True)),
    "adamw": (dk.MaskedAdamW, torch.optim.AdamW,
              dict(lr=1e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1)),
}

# Every optimizer's cases run with the slow tests; SGD's and AdamW's also in the dev loop.
FAST = ("sgd", "adamw")


def _names(names):
    return [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
            for name in names]


def _state_names(opt):
    """The state tensors the optimizer must keep per parameter."""
    if isinstance(opt, torch.optim.SGD):
        return ["momentum_buffer"] if opt.defaults["momentum"] else []
    return ["exp_avg", "exp_avg_sq"]


def _params(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]


def _fill_grads(params, step, masks=None):
    """Gradients that depend on the step and on the weights (so trajectories feed back)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, generator=gen).to(p.device)
        g = noise + 0.5 * p.detach().float() + 0.2 * torch.sin(3 * p.detach().float())
        if masks is not None:
            g = g * masks[i]
        p.grad = g.to(p.dtype)


def _random_masks(params, seed=7, density=0.6):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) < density).to(p.device) for p in params]


@pytest.mark.parametrize("name", _names(OPTIMIZERS))
@per_backend
def test_all_true_masks_match_torch_optim(backend, device, name):
    masked_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours, theirs = _params(device), _params(device)
    opt = masked_cls(ours, **kwargs)
    ref = torch_cls(theirs, **kwargs)
    opt.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in ours})
    for step in range(STEPS):
        for params, o in ((ours, opt), (theirs, ref)):
            _fill_grads(params, step)
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TRAJECTORY)
    for a, b in zip(ours, theirs):
        for key in _state_names(opt):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], **TRAJECTORY)


@pytest.mark.parametrize("name", _names(["sgd", "adam", "adamw"]))
@per_backend
def test_no_masks_param_groups_scheduler_and_missing_grads(backend, device, name):
    """Two param groups with their own lr, a StepLR schedule, and a param without gradient."""
    masked_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours, theirs = _params(device), _params(device)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": kwargs["lr"] / 3}]

    opt, ref = masked_cls(groups(ours), **kwargs), torch_cls(groups(theirs), **kwargs)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5) for o in (opt, ref)]
    for step in range(40):
        for params, o, sched in ((ours, opt, scheds[0]), (theirs, ref, scheds[1])):
            o.zero_grad()
            _fill_grads(params[1:], step)  # params[0] never gets a gradient
            o.step()
            sched.step()
    assert ours[0].grad is None and len(opt.state[ours[0]]) == 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TRAJECTORY)


@pytest.mark.parametrize("name", _names(OPTIMIZERS))
@per_backend
def test_random_masks_keep_pruned_exactly_zero(backend, device, name):
    masked_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours, theirs = _params(device), _params(device)
    masks = _random_masks(ours)
    opt, ref = masked_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    opt.set_masks(dict(zip(ours, masks)))
    with torch.no_grad():
        for p, m in zip(theirs, masks):
            p.mul_(m)
    for step in range(STEPS):
        _fill_grads(ours, step)  # full gradients: the mask alone must keep pruned weights 0
        opt.step()
        _fill_grads(theirs, step, masks)
        ref.step()
        for p, m in zip(ours, masks):
            for t in [p] + [opt.state[p][key] for key in _state_names(opt)]:
                pruned = t.detach()[~m]
                assert (pruned == 0).all() and not torch.signbit(pruned).any(), f"step {step}"
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TRAJECTORY)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@per_backend
def test_dense_sparse_dense_regrows_from_zero(backend, device, name):
    """Through dense, sparse and re-dense phases: pruned weights restart from 0 with 0 state,
    exactly as a torch.optim run that masks gradients in the sparse phase."""
    masked_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours, theirs = _params(device), _params(device)
    opt, ref = masked_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    step = 0
    for phase in ("dense", "sparse", "redense"):
        if phase == "sparse":
            masks = dk.magnitude_masks([p.detach() for p in ours], 0.5)
            opt.set_masks(dict(zip(ours, masks)))
            with torch.no_grad():
                for p, m in zip(theirs, masks):
                    p.mul_(m)
                    for key in _state_names(ref):
                        ref.state[p][key].mul_(m)
        if phase == "redense":
            opt.clear_masks()
            assert opt.masks == {}
        for _ in range(30):
            _fill_grads(ours, step)
            opt.step()
            _fill_grads(theirs, step, masks if phase == "sparse" else None)
            ref.step()
            step += 1
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **TRAJECTORY)
    assert all((p != 0).float().mean() > 0.99 for p in ours[:1])  # pruned weights regrew


@pytest.mark.parametrize("name", _names(["sgd", "adam", "adamw"]))
@per_backend
def test_state_dict_round_trip_continues_identically(backend, device, name):
    masked_cls, _, kwargs = OPTIMIZERS[name]
    ours = _params(device)
    opt = masked_cls(ours, **kwargs)
    opt.set_masks({ours[0]: _random_masks(ours)[0]})
    for step in range(50):
        _fill_grads(ours, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in ours], "opt": opt.state_dict()}, buffer)
    for step in range(50, 100):
        _fill_grads(ours, step)
        opt.step()

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = masked_cls(resumed, **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert set(opt2.masks) == {resumed[0]}
    for step in range(50, 100):
        _fill_grads(resumed, step)
        opt2.step()
    for a, b in zip(ours, resumed):
        assert torch.equal(a, b)


@per_backend
def test_loads_a_torch_optim_state_dict(backend, device):
    theirs = _params(device)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(5):
        _fill_grads(theirs, step)
        ref.step()
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt = dk.MaskedAdamW(ours, lr=1e-2)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(5, 10):
        for params, o in ((ours, opt), (theirs, ref)):
            _fill_grads(params, step)
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TRAJECTORY)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
@per_backend
def test_half_precision_matches_torch_backend(backend, device, dtype, name):
    """fp16/bf16 params with fp32 math: every backend agrees with the reference backend."""
    masked_cls, _, kwargs = OPTIMIZERS[name]
    runs = []
    for selected in (backend, "torch"):
        dk.use_backend(selected)
        params = _params(device, dtype)
        opt = masked_cls(params, **kwargs)
        opt.set_masks(dict(zip(params, _random_masks(params))))
        for step in range(20):
            _fill_grads(params, step)
            opt.step()
        runs.append((params, opt))
    (ours, opt), (refs, ref) = runs
    for a, b in zip(ours, refs):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])
        for key in _state_names(opt):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_half_precision_one_step_is_fp32_math_rounded_once(torch_backend, device, dtype):
    """One reference step on fp16/bf16 equals torch.optim's fp32 step, rounded once."""
    params = _params(device, dtype)
    shadow = [p.detach().float().requires_grad_() for p in params]
    opt = dk.MaskedAdamW(params, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.1)
    _fill_grads(params, 0)
    for p, s in zip(params, shadow):
        s.grad = p.grad.float()
    opt.step()
    ref.step()
    for p, s in zip(params, shadow):
        assert torch.equal(p, s.detach().to(dtype))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@per_backend
def test_grad_scaler(backend, device, name):
    """GradScaler hands grad_scale/found_inf to the step: same result as torch.optim with it;
    an inf gradient skips the step (weights, state and step count unchanged)."""
    masked_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours, theirs = _params(device), _params(device)
    opt, ref = masked_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for _ in range(10):
        for params, o, scaler in ((ours, opt, scalers[0]), (theirs, ref, scalers[1])):
            o.zero_grad()
            loss = sum((p**2).sum() * (1 + 0.1 * i) for i, p in enumerate(params))
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TRAJECTORY)

    before = [p.detach().clone() for p in ours]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scalers[0].scale(sum((p**2).sum() for p in ours)).backward()
    ours[1].grad[0] = float("inf")
    scalers[0].step(opt)
    assert all(torch.equal(p, b) for p, b in zip(ours, before))
    after = opt.state_dict()
    for i, state in state_before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][i][key], value)


@per_backend
def test_set_masks_prunes_params_and_state_at_once(backend, device):
    ours = _params(device)
    opt = dk.MaskedAdam(ours, lr=1e-2)
    _fill_grads(ours, 0)
    opt.step()
    masks = _random_masks(ours)
    opt.set_masks({ours[0]: masks[0]})
    for t in (ours[0], opt.state[ours[0]]["exp_avg"], opt.state[ours[0]]["exp_avg_sq"]):
        assert (t.detach()[~masks[0]] == 0).all() and (t.detach()[masks[0]] != 0).any()
    assert (ours[1] != 0).all()  # unmasked params are untouched
    assert set(opt.masks) == {ours[0]}
    opt.set_masks({ours[1]: masks[1]})  # replaces: ours[0] is no longer masked
    assert set(opt.masks) == {ours[1]}


@per_backend
def test_functional_sgd_first_step_rule(backend, device):
    """torch.optim starts momentum as a copy of the gradient: a zero buffer with dampening=0."""
    p = torch.randn(50, device=device)
    g = torch.randn(50, device=device)
    buf = torch.zeros(50, device=device)
    ref = p.clone().requires_grad_()
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.5)
    ref.grad = g.clone()
    sgd.step()
    dk.masked_sgd_([p], [g], [buf], None, lr=0.1, momentum=0.9, dampening=0.0)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(buf, sgd.state[ref]["momentum_buffer"], rtol=1e-6, atol=1e-7)


@per_backend
def test_functional_adam_steps_per_tensor(backend, device):
    """Each tensor uses its own step count for the bias corrections."""
    ps = [torch.randn(20, device=device) for _ in range(2)]
    gs = [torch.randn(20, device=device) for _ in range(2)]
    ms = [torch.randn(20, device=device) * 0.1 for _ in range(2)]
    vs = [torch.rand(20, device=device) * 0.01 for _ in range(2)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    one_call = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    dk.masked_adam_(one_call[0], gs, one_call[1], one_call[2], None, [3, 40], **hyper)
    for i, step in enumerate([3, 40]):
        p, m, v = ps[i].clone(), ms[i].clone(), vs[i].clone()
        dk.masked_adam_([p], [gs[i]], [m], [v], None, step, **hyper)
        torch.testing.assert_close(one_call[0][i], p, rtol=0, atol=0)
    assert not torch.equal(one_call[0][0] - ps[0], one_call[0][1] - ps[1])


@per_backend
def test_opcheck(backend, device):
    p = torch.randn(6, 5, device=device)
    g, buf = torch.randn_like(p), torch.randn_like(p)
    mask = torch.rand(6, 5, device=device) < 0.5
    scale = torch.tensor(4.0, device=device)
    torch.library.opcheck(torch.ops.dsd.masked_sgd_, (
        [p.clone(), p.clone()], [g, g], [buf.clone(), buf.clone()], [mask, None],
        0.1, 0.9, 0.0, 1e-2, True, False, scale))
    torch.library.opcheck(torch.ops.dsd.masked_adam_, (
        [p.clone()], [g], [buf.clone()], [buf.abs()], [mask], [3.0],
        0.1, 0.9, 0.99, 1e-8, 1e-2, True, False, None))


@per_backend
def test_masks_take_the_layout_of_channels_last_parameters(backend, device):
    """A mask given in another layout is stored in its parameter's (so no step converts it),
    with the same values; a loaded state_dict's masks likewise."""
    p = torch.randn(6, 5, 3, 3, device=device).to(memory_format=torch.channels_last)
    p.requires_grad_()
    mask = torch.rand(p.shape, generator=torch.Generator().manual_seed(3)).to(device) < 0.5
    opt = dk.MaskedSGD([p], lr=0.1, momentum=0.9)
    opt.set_masks({p: mask})
    assert opt.masks[p].stride() == p.stride() and torch.equal(opt.masks[p], mask)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
        assert (p[~mask] == 0).all() and (opt.state[p]["momentum_buffer"][~mask] == 0).all()
    state = opt.state_dict()
    state["masks"] = {0: mask.contiguous()}
    opt.load_state_dict(state)
    assert opt.masks[p].stride() == p.stride() and torch.equal(opt.masks[p], mask)


def _plan_script(name, device, uncached):
    """Run a script of every change a step's plan (dsd_kernels.optim.plan.Plan) depends on, with a
    step after each. Returns snapshots of every parameter and state value after each step,
    and per step and param group whether the step reused the group's plan. With `uncached`,
    every step plans afresh and counts Adam's steps tensor by tensor, as without a cache."""
    masked_cls, _, kwargs = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device)

    params = [torch.nn.Parameter(randn(*s)) for s in [(6, 5), (7,), (2, 3, 4), (3,), (5,)]]
    opt = masked_cls(params[:3], **kwargs)
    snapshots, reused = [], []

    def step(new_grads=True, without=()):
        for p in (p for group in opt.param_groups for p in group["params"]):
            if any(p is q for q in without):
                p.grad = None
            elif new_grads or p.grad is None:
                p.grad = randn(*p.shape).to(p.dtype)
            else:  # the same gradient tensors, written in place
                p.grad.copy_(randn(*p.shape))
        if uncached:
            opt._plans = ()
        before = list(opt._plans)
        opt.step()
        reused.append([plan is not None and i < len(before) and plan is before[i]
                       for i, plan in enumerate(opt._plans)])
        snapshots.append([t.detach().clone() for p in params for t in
                          [p, *opt.state.get(p, {}).values()] if t is not None])

    def masks(seed):
        g = torch.Generator().manual_seed(seed)
        return {p: (torch.rand(p.shape, generator=g) > 0.4).to(device) for p in params[:2]}

    def refused(match):
        """A step the checks refuse changes nothing, its plan kept or not."""
        before = [t.detach().clone() for p in params for t in [p, *opt.state.get(p, {}).values()]]
        with pytest.raises(ValueError, match=match):
            opt.step()
        after = [t.detach() for p in params for t in [p, *opt.state.get(p, {}).values()]]
        assert all(torch.equal(a, b) for a, b in zip(after, before))

    step()  # creates the state: a plan made then is not kept
    step()  # plans once, kept
    step()  # new gradients
    step(new_grads=False)
    for group in opt.param_groups:  # hyper-parameters never replan
        group.update(lr=group["lr"] * 0.5, weight_decay=0.2)
        if "betas" in group:
            group["betas"] = (0.8, 0.99)
        else:
            group["dampening"] = 0.3
    step()
    opt.set_masks(masks(1))
    step()
    step()
    opt.set_masks(masks(2))
    step()
    opt.clear_masks()
    step()
    step(without=[params[1]])
    step()
    state = opt.state[params[0]]
    for key in list(state):  # every state tensor of a parameter replaced by hand
        state[key] = state[key].clone()
    step()
    step()
    opt.state[params[0]] = dict(opt.state[params[0]])  # a new dict of the same tensors
    step()
    step()
    foreign = torch.nn.Parameter(torch.zeros(1))
    opt.state[foreign] = {}  # state of no parameter of the groups, added and removed
    step()
    del opt.state[foreign]
    step()
    del opt.state[params[2]]  # one parameter's state reset: its next step is a first
    step()
    step()
    params[1].data = params[1].data.clone()  # new storage, same parameter: the plan holds
    step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step()
    opt.param_groups[0]["params"][1] = params[3]  # replaced by another (its state stays)
    step()
    step()
    params[2].data = torch.randn(4, 3, generator=gen).to(device)  # resized, state reset
    del opt.state[params[2]]
    step()
    step()
    opt.add_param_group({"params": [params[4]], "lr": 0.03})
    step()
    step()
    step()
    if name == "sgd":  # momentum 0 reads no state; back to momentum, the buffers are there
        opt.param_groups[0]["momentum"] = 0.0
        step()
        opt.param_groups[0]["momentum"] = 0.9
        step()
    params[0].data = params[0].data.double()  # a dtype change the checks refuse
    refused("param group 0, parameter 0 has dtype torch.float64")
    params[0].data = params[0].data.float()
    step()
    params[3].grad = params[3].grad.to_sparse()
    refused("param group 0, parameter 1 has a sparse gradient")
    step()
    return snapshots, reused


@pytest.fixture(params=["cpp", "python"])
def kinds(request, monkeypatch):
    """The plans' key of tensor kinds read by the C++ library, and by the Python fallback."""
    function = _kinds_in_cpp() if request.param == "cpp" else host.tensor_kinds_in_python
    monkeypatch.setattr(host, "tensor_kinds", function)
    return lambda params, grads: function([params, grads])


def _kinds_in_cpp():
    """host.tensor_kinds as the C++ library installs it (the C++ backend builds in CI)."""
    if "cpp" not in dk.available_backends():
        pytest.skip("the C++ backend is not available")
    assert host.tensor_kinds is not host.tensor_kinds_in_python
    return host.tensor_kinds


def test_kinds_differ_exactly_when_a_plan_would(kinds):
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    grads = [torch.ones(3, 2), None]
    other = [  # each differs from (params, grads) in one thing a plan depends on
        (params, [torch.ones(3, 2), torch.ones(4)]),                 # which have gradients
        (params, [None, None]),
        (params, [torch.ones(3, 2).to_sparse(), None]),              # a gradient's layout
        (params, [torch.ones(3, 2).as_subclass(_Tagged), None]),    # a gradient's type
        (params, [torch.ones(3, 2, dtype=torch.float16), None]),     # a gradient's dtype
        (params, [torch.ones(3, 2, device="meta"), None]),           # a gradient's device
        ([params[0], params[1].detach()], grads),                    # a param's type
        ([params[0], params[1].double()], grads),                    # a param's dtype
        ([params[0].to("meta"), params[1]], grads),                  # a param's device
        (params[:1], grads[:1]),                                     # how many
    ]
    key = kinds(params, grads)
    # Other tensors of the same kinds, other values, sizes and strides: the same key.
    same = [torch.nn.Parameter(torch.ones(2, 5).t()), torch.nn.Parameter(torch.ones(1))]
    assert kinds(same, [torch.zeros(7, 9), None]) == key
    keys = [kinds(*lists) for lists in other]
    assert all(k != key for k in keys)
    assert len(set(keys)) == len(keys)


class _Tagged(torch.Tensor):
    pass


def test_kinds_refuse_what_is_not_a_tensor():
    tensor_kinds = _kinds_in_cpp()
    with pytest.raises(TypeError):
        tensor_kinds([[torch.zeros(2), 3]])
    with pytest.raises(TypeError):
        tensor_kinds([torch.zeros(2)])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@per_backend
def test_reused_plans_match_fresh_ones_through_every_change(backend, device, name, kinds,
                                                            monkeypatch):
    """A step reuses its param group's plan (its checks, buckets and state lists) while
    nothing the plan was built from changed, and plans again after any change: bit for bit
    the same steps as planning afresh every step."""
    from dsd_kernels.optim import masked

    cached, reused = _plan_script(name, device, uncached=False)
    monkeypatch.setattr(masked, "_shared_counts", lambda bucket: None)
    fresh, _ = _plan_script(name, device, uncached=True)
    assert len(cached) == len(fresh)
    for step, (got, expected) in enumerate(zip(cached, fresh)):
        assert len(got) == len(expected), f"step {step}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.dtype == e.dtype and torch.equal(g, e), f"step {step}, tensor {i}"
    F, T = False, True
    expected = [[F], [F], [T], [T], [T],  # created, planned, reused: new grads, same, hyper
                [F], [T], [F], [F],  # set_masks, reused, set_masks, clear_masks
                [F], [F], [F], [T],  # a gradient missing, back; a state tensor replaced
                [F], [T], [T], [T],  # a new state dict; reused; other state: reused
                [F], [F], [T],  # a state reset: a first step, planned, reused after p.data=
                [F],  # load_state_dict
                [F], [F], [F], [F],  # a parameter replaced, planned; resized with its state
                [T, F], [T, F], [T, T]]  # add_param_group: group 0's plan holds
    expected += [[F, T], [F, T]] if name == "sgd" else []  # momentum 0 and back
    expected += [[T, T], [T, T]]  # after a refused dtype change, a refused sparse gradient
    assert reused == expected
