"""Masked optimizers through a checkpoint: state_dict round trips keep the masks, and a run
saved (model and optimizer state_dict, torch.save to bytes), loaded into fresh objects and
continued equals the uninterrupted run bit for bit, for every optimizer masked exactly."""

import pytest
import torch
from torch import nn

from dsd_kernels.optim import make_masked_

import _optim_db_cases as db
from _optim_db_cases import one_thread  # noqa: F401 (autouse: this module runs on one thread)

# Each optimizer's richest configuration, Adam's amsgrad (the general step of a fused class)
# and Lion.
CASES = db.one_case_per_optimizer("fused", "general") + [
    db.db_case(torch.optim.Adam, "amsgrad"), db.LION_CASES[1]]



def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _masks(model):
    gen = torch.Generator().manual_seed(7)
    weight, bias = model[0].weight, model[0].bias
    return {weight: torch.rand(weight.shape, generator=gen) < 0.5,
            bias: torch.tensor([True, False, True, False, True])}


def _train(model, opt, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _masked(case, model):
    return make_masked_(case.make(list(model.parameters())))


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_equals_the_uninterrupted_one(case):
    model = _model(0)
    opt = _masked(case, model)
    opt.set_masks(_masks(model))
    _train(model, opt, range(3))
    checkpoint = db.through_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()})
    _train(model, opt, range(3, 6))

    resumed_model = _model(1)  # other weights, replaced by the checkpoint's
    resumed = _masked(case, resumed_model)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    masks = _masks(resumed_model)
    assert set(resumed.masks) == set(masks)
    assert all(torch.equal(resumed.masks[p], m) for p, m in masks.items())
    _train(resumed_model, resumed, range(3, 6))
    params, resumed_params = list(model.parameters()), list(resumed_model.parameters())
    db.assert_identical(opt, params, resumed, resumed_params)
    db.assert_pruned_zero(resumed_params[:2], list(masks.values()))


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_keeps_masks_and_state(case):
    model = _model(0)
    opt = _masked(case, model)
    opt.set_masks(_masks(model))
    _train(model, opt, range(2))
    saved = opt.state_dict()
    assert saved["masks"].keys() == {0, 1}
    other = _masked(case, model)
    other.load_state_dict(saved)
    assert all(torch.equal(other.masks[p], m) for p, m in opt.masks.items())
    params = list(model.parameters())
    db.assert_identical(opt, params, other, params)
    db.assert_fresh_at_pruned(case, other, params[:2], [opt.masks[p] for p in params[:2]])


@pytest.mark.parametrize("case", db.one_case_per_optimizer("projected"))
def test_projected_resumed_run_equals_the_uninterrupted_one(case):
    """Adafactor's factored moments, Muon's momentum and LBFGS's flat history through a
    checkpoint (Muon takes 2-D parameters only: no model here)."""
    weights, masks = db.initial(case)
    opt, params = db.masked(case, weights, masks)
    for step in range(2):
        db.take_step(case, opt, params, db.targets(case, step), masks, 1.0)
    checkpoint = db.through_bytes({"params": [p.detach() for p in params],
                                   "optimizer": opt.state_dict()})
    resumed_params = db.as_params(case, checkpoint["params"])
    resumed = make_masked_(case.make(resumed_params))
    resumed.load_state_dict(checkpoint["optimizer"])
    for step in range(2, 4):
        for o, ps in ((opt, params), (resumed, resumed_params)):
            db.take_step(case, o, ps, db.targets(case, step), masks, 1.0)
    db.assert_identical(opt, params, resumed, resumed_params)
    db.assert_pruned_zero(resumed_params, masks)
