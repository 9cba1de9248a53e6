"""make_masked_'s general path: torch.optim's element-wise optimizers other than SGD, Adam and
AdamW, masked exactly (docs/design.md, The general masked step)."""

import pytest
import torch
from torch import optim

import dsd_kernels as dk
from dsd_kernels.optim import LR_SCALE, make_masked_

from _oracle import assert_same_state

CONFIGS = {
    "Adadelta": (optim.Adadelta, dict(lr=0.5, rho=0.8, weight_decay=0.01)),
    "Adagrad": (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01,
                                initial_accumulator_value=0.25)),
    "Adamax": (optim.Adamax, dict(lr=0.02, weight_decay=0.01)),
    "ASGD": (optim.ASGD, dict(lr=0.05, t0=2, weight_decay=0.01)),
    "NAdam": (optim.NAdam, dict(lr=0.01, weight_decay=0.01)),
    "NAdam decoupled": (optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "RAdam": (optim.RAdam, dict(lr=0.01, weight_decay=0.01)),
    "RAdam decoupled": (optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "RMSprop": (optim.RMSprop, dict(lr=0.01)),
    "RMSprop centered momentum": (optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True,
                                                  weight_decay=0.01, maximize=True)),
    "Rprop": (optim.Rprop, dict(lr=0.01)),
    "Rprop maximize": (optim.Rprop, dict(lr=0.02, etas=(0.4, 1.3), maximize=True)),
}
SHAPES = [(7, 5), (33,), (1,)]








def _pruned_are_plus_zero(params, masks):
    for p, m in zip(params, masks):
        pruned = p.detach()[~m]
        assert (pruned == 0).all() and not torch.signbit(pruned).any()


def _setup(config, dtype, seed=0):
    cls, kwargs = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    masks = [torch.rand(s, generator=gen) < 0.6 for s in SHAPES]
    return cls, kwargs, params, masks


def _grads(params, masks, seed, pruned_fill=None):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    if pruned_fill is not None:
        grads = [g.masked_fill(~m, pruned_fill) for g, m in zip(grads, masks)]
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS)
def test_masked_step_is_the_step_on_zeroed_gradients(config, dtype):
    """Bit for bit at every position: weights, and state (at pruned positions what the
    optimizer leaves at a weight that only saw 0); nothing depends on the gradients at pruned
    positions; after clear_masks pruned weights regrow."""
    cls, kwargs, params, masks = _setup(config, dtype)
    ref_params = [p.detach().masked_fill(~m, 0.0).requires_grad_() for p, m in zip(params, masks)]
    runs = []
    for _ in range(2):  # the gradients at pruned positions differ between the runs
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = make_masked_(cls(ps, **kwargs))
        assert type(opt).__name__ == f"Masked{cls.__name__}" and isinstance(opt, cls)
        opt.set_masks(dict(zip(ps, masks)))
        runs.append((opt, ps))
    ref = cls(ref_params, **kwargs)
    for step in range(4):
        for (opt, ps), fill in zip(runs, (float("nan"), 3.0)):
            for p, g in zip(ps, _grads(ps, masks, step, pruned_fill=fill)):
                p.grad = g
            opt.step()
            _pruned_are_plus_zero(ps, masks)
        for p, g in zip(ref_params, _grads(ref_params, masks, step, pruned_fill=0.0)):
            p.grad = g
        ref.step()
        for opt, ps in runs:
            assert_same_state(opt, ps, ref, ref_params)
    assert_same_state(*runs[0], *runs[1])  # the gradients at pruned positions left no trace
    opt, ps = runs[0]
    opt.clear_masks()  # re-dense: pruned weights regrow from 0 and a fresh state
    for step in range(4, 6):
        for p, g in zip(ps, _grads(ps, masks, step)):
            p.grad = g
        opt.step()
    assert all((p.detach()[~m] != 0).all() for p, m in zip(ps, masks))


@pytest.mark.parametrize("config", ["Rprop", "RMSprop centered momentum", "Adagrad"])
def test_lr_scale_scales_the_step_and_the_fresh_step_size(config):
    cls, kwargs, params, masks = _setup(config, torch.float32, seed=3)
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = make_masked_(cls(ps, **kwargs))
    opt.set_masks(dict(zip(ps, masks)))
    opt.param_groups[0][LR_SCALE] = 0.5
    ref_params = [p.detach().masked_fill(~m, 0.0).requires_grad_() for p, m in zip(params, masks)]
    ref = cls(ref_params, **{**kwargs, "lr": kwargs["lr"] * 0.5})
    for step in range(3):
        for p, r, g in zip(ps, ref_params, _grads(ps, masks, step, pruned_fill=0.0)):
            p.grad, r.grad = g, g.clone()
        opt.step()
        ref.step()
    assert_same_state(opt, ps, ref, ref_params)
    assert opt.param_groups[0]["lr"] == kwargs["lr"]


def test_grad_scaler_and_closure():
    cls, kwargs, params, masks = _setup("RMSprop centered momentum", torch.float32, seed=4)
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = make_masked_(cls(ps, **kwargs))
    opt.set_masks(dict(zip(ps, masks)))
    ref_params = [p.detach().masked_fill(~m, 0.0).requires_grad_() for p, m in zip(params, masks)]
    ref = cls(ref_params, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for step in range(3):
        grads = _grads(ps, masks, step)
        scale = scaler.scale(torch.ones(())).item()
        for p, r, g, m in zip(ps, ref_params, grads, masks):
            p.grad, r.grad = g * scale, g.masked_fill(~m, 0.0)
        scaler.step(opt)
        scaler.update()
        ref.step()
    assert_same_state(opt, ps, ref, ref_params)

    def closure():  # its gradients are masked too: the closure runs before the masking
        opt.zero_grad()
        loss = sum((p * w).sum() for p, w in zip(ps, _grads(ps, masks, 9)))
        loss.backward()
        return loss

    before = [p.detach().clone() for p in ps]
    assert opt.step(closure) is not None
    assert all((p.detach()[~m] == 0).all() for p, m in zip(ps, masks))
    assert not torch.equal(ps[0].detach()[masks[0]], before[0][masks[0]])


def test_state_dict_round_trip_keeps_masks():
    cls, kwargs, params, masks = _setup("Rprop", torch.float32, seed=5)
    opt = make_masked_(cls(params, **kwargs))
    opt.set_masks(dict(zip(params, masks)))
    for p, g in zip(params, _grads(params, masks, 0)):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    other = make_masked_(cls(params, **kwargs))
    other.load_state_dict(saved)
    assert all(torch.equal(other.masks[p], m) for p, m in zip(params, masks))
    assert_same_state(other, params, opt, params)


def test_a_step_held_from_before_the_conversion_refuses():
    params = [torch.randn(4, requires_grad=True)]
    opt = optim.Rprop(params)
    old_step = opt.step
    make_masked_(opt)
    opt.set_masks({params[0]: torch.tensor([True, False, True, False])})
    params[0].grad = torch.ones(4)
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="unmasked step was called on a masked optimizer"):
        old_step()
    assert torch.equal(params[0].detach(), before)


def test_pruning_at_set_masks_uses_fresh_values():
    p = torch.randn(6, requires_grad=True)
    opt = make_masked_(optim.Rprop([p], lr=0.03))
    p.grad = torch.randn(6)
    opt.step()
    mask = torch.tensor([True, False] * 3)
    opt.set_masks({p: mask})
    state = opt.state[p]
    assert (p.detach()[~mask] == 0).all() and (state["prev"][~mask] == 0).all()
    assert (state["step_size"][~mask] == torch.tensor(0.03)).all()
    assert dk.optim.make_masked_(opt) is opt
