"""make_masked_ over torch's own optimizer database (every optimizer, every configuration on
CPU, every error input) and a third-party optimizer: the exactness contract of
docs/design.md (The general masked step) checked against torch.optim's unmasked step."""

from pathlib import Path

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from dsd_kernels.optim import LR_SCALE, make_masked_

import _optim_db_cases as db
from _optim_db_cases import one_thread  # noqa: F401 (autouse: this module runs on one thread)

STEPS = 3
TRAINING_DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"



def test_every_optimizer_of_the_database_has_a_path_and_the_docs_table_says_the_same():
    assert {info.optim_cls for info in optim_db} == set(db.PATHS)
    documented = db.documented_paths(TRAINING_DOC)
    ours = {cls.__name__: db.DOCUMENTED[path] for cls, path in db.PATHS.items()}
    assert documented == ours


@pytest.mark.parametrize("case", db.db_cases("fused", "general") + db.LION_CASES +
                         db.SUBCLASS_CASES)
def test_masked_step_is_the_unmasked_step_on_zeroed_gradients(case):
    """Pruned after a dense step; then, from the same state, bit for bit at kept positions
    (the fused three: within their kernels' tolerance); pruned weights +0.0 and
    parameter-shaped state fresh after set_masks and every step; nothing depends
    on the gradients at pruned positions; after clear_masks, the unmasked optimizer's steps
    from the same state."""
    weights, masks = db.initial(case)
    runs = [db.masked(case, weights, masks, dense_steps=1) for _ in range(2)]
    for opt, params in runs:  # pruned with a history of state
        db.assert_pruned_zero(params, masks)
        db.assert_fresh_at_pruned(case, opt, params, masks)
    ref, ref_params = db.unmasked_copy(case, *runs[0])
    fused = db.runs_fused(runs[0][0])
    for step in range(STEPS):
        target = db.targets(case, step)
        for (opt, params), pruned in zip(runs, (float("nan"), 7.0)):
            db.take_step(case, opt, params, target, masks, pruned)
            db.assert_pruned_zero(params, masks)
            db.assert_fresh_at_pruned(case, opt, params, masks)
        db.take_step(case, ref, ref_params, target, masks, 0.0)
        db.assert_kept_equal(*runs[0], ref, ref_params, masks, fused)
    db.assert_identical(*runs[0], *runs[1])

    opt, params = runs[0]
    opt.clear_masks()
    ref, ref_params = db.unmasked_copy(case, opt, params)
    for step in range(STEPS, STEPS + 2):
        target = db.targets(case, step)
        db.take_step(case, opt, params, target)
        db.take_step(case, ref, ref_params, target)
        everywhere = [torch.ones_like(m) for m in masks]
        db.assert_kept_equal(opt, params, ref, ref_params, everywhere, fused)
    assert any((p.detach()[~m] != 0).any() for p, m in zip(params, masks))  # regrown


@pytest.mark.parametrize("case", db.one_case_per_optimizer("fused", "general") + [
    db.db_case(torch.optim.Adam, "amsgrad"), db.db_case(torch.optim.Adagrad, "Tensor lr"),
    db.LION_CASES[1], db.SUBCLASS_CASES[1]])
def test_lr_scale_steps_as_the_optimizer_at_the_scaled_lr(case):
    """DSD's re-dense factor (the param group's dsd_lr_scale): the masked step equals the
    unmasked optimizer's made with lr times the factor, fresh state included (Rprop's step
    size starts at the step's lr)."""
    lr = case.make([torch.zeros(1, requires_grad=True)]).defaults["lr"]
    scaled = db.Case(case.cls, {**case.kwargs, "lr": lr * 0.5}, case.closure)
    weights, masks = db.initial(case)
    opt, params = db.masked(case, weights, masks)
    for group in opt.param_groups:
        group[LR_SCALE] = 0.5
    ref_params = db.as_params(case, [w.masked_fill(~m, 0.0) for w, m in zip(weights, masks)])
    ref = scaled.make(ref_params)
    for step in range(STEPS):
        target = db.targets(case, step)
        db.take_step(case, opt, params, target, masks, float("nan"))
        db.take_step(case, ref, ref_params, target, masks, 0.0)
        db.assert_kept_equal(opt, params, ref, ref_params, masks, db.runs_fused(opt))
        db.assert_fresh_at_pruned(scaled, opt, params, masks)
    assert opt.param_groups[0]["lr"] == lr  # lr, the scheduler's, is left as it was


@pytest.mark.parametrize("case", db.db_cases("projected"))
def test_projected_step_keeps_pruned_weights_zero_and_ignores_their_gradients(case):
    weights, masks = db.initial(case)
    runs = [db.masked(case, weights, masks, dense_steps=1) for _ in range(2)]
    before = [p.detach().clone() for p in runs[0][1]]
    for step in range(STEPS):
        target = db.targets(case, step)
        for (opt, params), pruned in zip(runs, (float("nan"), 7.0)):
            db.take_step(case, opt, params, target, masks, pruned)
            db.assert_pruned_zero(params, masks)
            db.assert_finite(opt, params)
    db.assert_identical(*runs[0], *runs[1])
    assert any(not torch.equal(p.detach()[m], b[m]) for p, b, m in zip(runs[0][1], before, masks))


@pytest.mark.parametrize("case", db.db_cases("refused"))
def test_refused_with_a_one_line_reason_and_left_as_it_was(case):
    weights, _ = db.initial(case)
    opt = case.make(db.as_params(case, weights))
    state = opt.state_dict()
    with pytest.raises(TypeError, match=db.REFUSALS[case.cls]) as refusal:
        make_masked_(opt)
    assert "\n" not in str(refusal.value)
    assert type(opt) is case.cls and opt.state_dict() == state


def _expect(error):
    """A context manager expecting the database's error (or warning) and message."""
    if issubclass(error.error_type, Warning):
        return pytest.warns(error.error_type, match=error.error_regex)
    return pytest.raises(error.error_type, match=error.error_regex)


@pytest.mark.parametrize("cls, index", db.db_error_cases())
def test_error_inputs_raise_as_in_torch(cls, index):
    """Construction errors: the masked class constructed alike (the fused three), or torch's
    constructor before make_masked_ (the others), and a masked optimizer's add_param_group
    given the groups after the first; step errors: the masked optimizer's step."""
    error = db.error_input(cls, index)
    params, kwargs = error.optimizer_error_input.params, error.optimizer_error_input.kwargs
    if params is None:  # the database's "any parameters": its errors come from the kwargs
        params = [torch.randn(2, 3, requires_grad=True)]
    if db.PATHS[cls] == "refused":
        pytest.skip(f"{cls.__name__} cannot be masked (documented): its own errors apply")
    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with _expect(error):
            db.FUSED_CLASSES.get(cls, cls)(params, **kwargs)
        if isinstance(params, list) and len(params) > 1 and isinstance(params[0], dict):
            first = make_masked_(cls([params[0]], **kwargs))
            with _expect(error):
                for group in params[1:]:
                    first.add_param_group(group)
        return
    opt = cls(params, **kwargs)
    try:
        make_masked_(opt)
    except ValueError as refusal:  # documented: parameters of other dtypes are refused
        assert type(opt) is cls and "dtype" in str(refusal), refusal
        dtype = params[0].dtype
        assert dtype not in (torch.float32, torch.float16, torch.bfloat16), refusal
    with _expect(error):
        opt.step()


@pytest.mark.parametrize("case", db.db_cases("fused", "general") + db.LION_CASES +
                         db.SUBCLASS_CASES)
def test_grad_scaler_skips_inf_steps_and_unscales_finite_ones(case):
    weights, masks = db.initial(case)
    (scaled, params), (plain, plain_params) = (db.masked(case, weights, masks) for _ in "ab")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1000)
    for step in range(STEPS):
        target = db.targets(case, step)
        if step == 1:  # an inf at a kept position: the whole step is skipped
            target[0].view(-1)[0] = float("inf")
        scale = scaler.scale(torch.ones(())).item()
        grads = db.with_pruned([t * scale for t in target], masks, 3.0)
        for p, g in zip(params, grads):
            p.grad = g
        before = db.snapshot(scaled, params)
        scaler.step(scaled)
        scaler.update()
        db.assert_pruned_zero(params, masks)
        db.assert_fresh_at_pruned(case, scaled, params, masks)
        if step == 1:
            assert scaler.get_scale() == scale / 2
            db.assert_identical(*before, scaled, params)
            continue
        db.take_step(case, plain, plain_params, target, masks, 3.0)
        db.assert_identical(scaled, params, plain, plain_params)
