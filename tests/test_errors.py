"""Every bad input raises a ValueError that names what is wrong, and modifies nothing."""

import copy

import pytest
import torch

import dsd_kernels as dk


def _snapshot(*tensors):
    return [t.detach().clone() for t in tensors]


def _unchanged(tensors, snapshot):
    """Bit-for-bit the same values (NaN included); meta tensors hold no values to compare."""
    return all(t.device.type == "meta" or bool(((t == s) | (t.isnan() & s.isnan())).all())
               for t, s in zip(tensors, snapshot))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.fixture
def xs():
    return [torch.randn(4, 5), torch.randn(7)]


@pytest.mark.parametrize("bad, match", [
    (float("nan"), r"xs\[1\] contains NaN or Inf"),
    (float("inf"), r"xs\[1\] contains NaN or Inf"),
    (float("-inf"), r"xs\[1\] contains NaN or Inf"),
])
def test_non_finite_weights(xs, bad, match):
    xs[1][3] = bad
    before = _snapshot(*xs)
    _raises(match, dk.kth_smallest_abs, xs, 3)
    _raises(match, dk.magnitude_masks, xs, 0.5)
    _raises(match, dk.magnitude_masks, xs, 0.5, "global")
    assert _unchanged(xs, before)


def test_names_appear_in_errors(xs):
    xs[0][0, 0] = float("nan")
    _raises(r"xs\[0\] \('fc1.weight'\) contains NaN", dk.magnitude_masks, xs, 0.5,
            names=["fc1.weight", "fc2.weight"])
    _raises("names has 1 entries but xs has 2", dk.magnitude_masks, xs, 0.5, names=["a"])


@pytest.mark.parametrize("k, match", [
    (0, r"k must be in \[1, 27\]"), (28, r"k must be in \[1, 27\]"), (-1, r"k must be in"),
    (1.5, "k must be an integer"), (True, "k must be an integer, not bool"),
])
def test_k_out_of_range(xs, k, match):
    _raises(match, dk.kth_smallest_abs, xs, k)


@pytest.mark.parametrize("ks, match", [
    ([1], "k has 1 entries but xs has 2; give one per tensor"),
    ([1, 0], r"k\[1\] must be in \[1, \d+\] \(the elements of xs\[1\]\), got 0"),
    ([100, 1], r"k\[0\] must be in \[1, \d+\] \(the elements of xs\[0\]\), got 100"),
    ([1, 2.5], r"k\[1\] must be an integer"),
])
def test_per_tensor_k_out_of_range(xs, ks, match):
    _raises(match, dk.kth_smallest_abs, xs, ks)


@pytest.mark.parametrize("sparsity, match", [
    (-0.1, r"sparsity must be a number in \[0, 1\), got -0.1"),
    (1.0, r"sparsity must be a number in \[0, 1\), got 1.0"),
    (1.5, r"sparsity must be a number in \[0, 1\), got 1.5"),
    (float("nan"), r"sparsity must be a number in \[0, 1\), got nan"),
    ("0.5", r"sparsity must be a number in \[0, 1\), got '0.5'"),
    (True, r"sparsity must be a number in \[0, 1\), got True"),
])
def test_bad_sparsity(xs, sparsity, match):
    _raises(match, dk.magnitude_masks, xs, sparsity)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=0.5, pruned=[1, 1]), "give either sparsity or pruned .*, not both"),
    (dict(), "give either sparsity or pruned .*, not neither"),
    (dict(pruned=3), "pruned must be a list of one int per tensor for scope='layer', not int"),
    (dict(pruned=[1]), "pruned has 1 entries but xs has 2; give one per tensor"),
    (dict(pruned=[21, 0]), r"pruned\[0\] must be in \[0, 20\] \(the elements of xs\[0\]\)"),
    (dict(pruned=[0, -1]), r"pruned\[1\] must be in \[0, 7\]"),
    (dict(pruned=[0, 1.5]), r"pruned\[1\] must be an integer"),
    (dict(pruned=28, scope="global"), r"pruned must be in \[0, 27\] \(the elements of xs\)"),
    (dict(pruned=[3], scope="global"), "pruned must be an integer, not list"),
])
def test_bad_pruned_counts(xs, kwargs, match):
    _raises(match, dk.magnitude_masks, xs, **kwargs)


def test_bad_scope(xs):
    _raises("scope must be one of 'layer', 'global'", dk.magnitude_masks, xs, 0.5, "model")


@pytest.mark.parametrize("bad, match", [
    ([], "xs is an empty list"),
    ("weights", "xs must be a tensor or a list of tensors, not str"),
    ([torch.randn(3), 4.0], r"xs\[1\] must be a tensor, not float"),
    ([torch.randn(3), torch.randn(3, dtype=torch.float64)],
     r"xs\[1\] has dtype torch.float64; supported"),
    ([torch.arange(4)], r"xs\[0\] has dtype torch.int64"),
    ([torch.randn(3), torch.empty(3, device="meta")], r"xs\[1\] is on meta but xs\[0\] is on cpu"),
    ([torch.randn(3, 3).to_sparse()], r"xs\[0\] is a torch.sparse_coo tensor"),
])
def test_bad_tensor_lists(bad, match):
    _raises(match, dk.kth_smallest_abs, bad, 1)
    _raises(match, dk.magnitude_masks, bad, 0.5)


BAD_MASKS = [
    (lambda xs: [torch.ones(4, 5, dtype=torch.bool)], "masks has 1 entries but xs has 2"),
    (lambda xs: [torch.ones(4, 5, dtype=torch.bool), torch.ones(6, dtype=torch.bool)],
     r"masks\[1\] has shape \(6\) but xs\[1\] has shape \(7\)"),
    (lambda xs: [torch.ones(4, 5, dtype=torch.uint8), torch.ones(7, dtype=torch.bool)],
     r"masks\[0\] must be a bool tensor \(True = kept\), not torch.uint8"),
    (lambda xs: [torch.ones(4, 5, dtype=torch.bool), torch.ones(7, dtype=torch.bool,
                                                                device="meta")],
     r"masks\[1\] is on meta but xs\[1\] is on cpu"),
]


@pytest.mark.parametrize("masks, match", BAD_MASKS)
def test_apply_masks_bad_masks(xs, masks, match):
    xs[1][0] = float("nan")  # NaN weights are fine to mask; bad masks are not
    before = _snapshot(*xs)
    _raises(match, dk.apply_masks_, xs, masks(xs))
    assert _unchanged(xs, before)


@pytest.mark.parametrize("masks, match", BAD_MASKS)
def test_fill_pruned_bad_masks(xs, masks, match):
    before = _snapshot(*xs)
    _raises(match, dk.fill_pruned_, xs, masks(xs), [1.0, 2.0])
    assert _unchanged(xs, before)


@pytest.mark.parametrize("values, match", [
    ([1.0], "values has 1 entries but xs has 2"),
    ("1.0", "values must be a number or a list of numbers, not str"),
    ([1.0, True], r"values\[1\] must be a real number, not bool"),
    ([None, 1.0], r"values\[0\] must be a real number, not NoneType"),
    ([torch.ones(2), 1.0], r"values\[0\] must be a real number or a one-element real tensor"),
    ([1.0, 1e39], r"values\[1\] = 1e\+39 overflows torch.float32, the dtype of xs\[1\]"),
])
def test_fill_pruned_bad_values(xs, values, match):
    masks = [x > 0 for x in xs]
    before = _snapshot(*xs)
    _raises(match, dk.fill_pruned_, xs, masks, values)
    assert _unchanged(xs, before)


def test_fill_pruned_value_beyond_half_range():
    x = torch.randn(6).half()
    kept, before = x > 0, _snapshot(x)
    _raises(r"values\[0\] = 65520.0 overflows torch.float16, the dtype of xs\[0\]",
            dk.fill_pruned_, x, kept, 65520.0)
    assert _unchanged([x], before)
    dk.fill_pruned_(x, kept, [torch.tensor(65504.0)])  # the largest fp16, as a tensor
    assert (x[~kept] == 65504).all()


def _sgd_args():
    params = [torch.randn(4, 5), torch.randn(7)]
    return dict(params=params, grads=[torch.randn_like(p) for p in params],
                momentum_buffers=[torch.randn_like(p) for p in params],
                masks=[p > 0 for p in params])


@pytest.mark.parametrize("change, match", [
    (dict(lr=-0.1), "lr must be >= 0"),
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(momentum=-0.5), "momentum must be >= 0"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(nesterov=True, dampening=0.1), "nesterov momentum requires"),
    (dict(grads=lambda a: [a["grads"][0], torch.randn(8)]),
     r"grads\[1\] has shape \(8\) but params\[1\] has shape \(7\)"),
    (dict(grads=lambda a: [a["grads"][0], torch.randn(7, dtype=torch.float16)]),
     r"grads\[1\] has dtype torch.float16 but params\[1\] has dtype torch.float32"),
    (dict(momentum_buffers=lambda a: a["momentum_buffers"][:1]),
     "momentum_buffers has 1 entries but params has 2"),
    (dict(momentum_buffers=None), "momentum_buffers must be a tensor or a list"),
    (dict(masks=lambda a: [a["masks"][0], torch.ones(3, dtype=torch.bool)]),
     r"masks\[1\] has shape \(3\) but params\[1\] has shape \(7\)"),
    (dict(grad_scale=torch.ones(2)), "grad_scale must be a one-element"),
])
def test_masked_sgd_bad_input_modifies_nothing(change, match):
    args = _sgd_args()
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
    for key, value in change.items():
        target = args if key in args else hyper
        target[key] = value(args) if callable(value) else value
    everything = [t for key in ("params", "momentum_buffers") for t in (args[key] or [])]
    before = _snapshot(*everything)
    grad_scale = hyper.pop("grad_scale", None)
    _raises(match, dk.masked_sgd_, args["params"], args["grads"], args["momentum_buffers"],
            args["masks"], grad_scale=grad_scale, **hyper)
    assert _unchanged(everything, before)


def test_masked_sgd_momentum_buffers_without_momentum():
    args = _sgd_args()
    _raises("momentum_buffers given but momentum is 0", dk.masked_sgd_, args["params"],
            args["grads"], args["momentum_buffers"], None, lr=0.1)


@pytest.mark.parametrize("change, match", [
    (dict(steps=0), r"steps\[0\] must be >= 1"),
    (dict(steps=[1]), "steps has 1 entries but params has 2"),
    (dict(steps="3"), "steps must be a number or a list of numbers"),
    (dict(beta1=1.0), "beta1 must be < 1"),
    (dict(beta2=-0.1), "beta2 must be >= 0"),
    (dict(eps=-1e-8), "eps must be >= 0"),
    (dict(exp_avgs=lambda a: [a["exp_avgs"][0], torch.randn(7, dtype=torch.bfloat16)]),
     r"exp_avgs\[1\] has dtype torch.bfloat16"),
    (dict(exp_avg_sqs=lambda a: [a["exp_avg_sqs"][0], torch.rand(7, device="meta")]),
     r"exp_avg_sqs\[1\] is on meta but params\[1\] is on cpu"),
    (dict(params=lambda a: [a["params"][0], torch.randn(7, dtype=torch.float64)]),
     r"params\[1\] has dtype torch.float64"),
])
def test_masked_adam_bad_input_modifies_nothing(change, match):
    params = [torch.randn(4, 5), torch.randn(7)]
    args = dict(params=params, grads=[torch.randn_like(p) for p in params],
                exp_avgs=[torch.randn_like(p) for p in params],
                exp_avg_sqs=[torch.rand_like(p) for p in params], masks=None, steps=[2, 3])
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    for key, value in change.items():
        target = args if key in args else hyper
        target[key] = value(args) if callable(value) else value
    everything = [t for key in ("params", "exp_avgs", "exp_avg_sqs") for t in args[key]]
    before = _snapshot(*everything)
    _raises(match, dk.masked_adam_, args["params"], args["grads"], args["exp_avgs"],
            args["exp_avg_sqs"], args["masks"], args["steps"], **hyper)
    assert _unchanged(everything, before)


@pytest.mark.parametrize("cls, flag", [
    (dk.MaskedAdam, "amsgrad"), (dk.MaskedAdamW, "amsgrad"), (dk.MaskedAdam, "capturable"),
    (dk.MaskedSGD, "differentiable"),
])
def test_unsupported_optimizer_flags(cls, flag):
    with pytest.raises(ValueError, match=f"{flag}=True, which the masked optimizers do not"):
        cls([torch.randn(3, requires_grad=True)], **{flag: True})


def test_set_masks_bad_input_changes_nothing():
    p, q = torch.randn(4, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = dk.MaskedSGD([p, q], lr=0.1, momentum=0.9)
    good = {p: p.detach() > 0}
    opt.set_masks(good)
    before = _snapshot(p, q)
    stranger = torch.randn(3, requires_grad=True)
    for bad, match in [
        ({stranger: torch.ones(3, dtype=torch.bool)}, "not a parameter of this optimizer"),
        ({q: torch.ones(4, dtype=torch.bool)}, r"has shape \(4\) but parameter 1 has shape \(3\)"),
        ({q: torch.ones(3)}, "must be a bool tensor"),
        ({q: torch.ones(3, dtype=torch.bool), p: torch.ones(5, 4, dtype=torch.bool)},
         r"shape \(5, 4\) but parameter 0 has shape \(4, 5\)"),
        ([(q, torch.ones(3, dtype=torch.bool))], r"set_masks takes a dict"),
    ]:
        _raises(match, opt.set_masks, bad)
        assert opt.masks.keys() == good.keys() and opt.masks[p] is good[p]
        assert _unchanged([p, q], before)


def test_load_state_dict_bad_masks_changes_nothing():
    p = torch.randn(4, 5, requires_grad=True)
    opt = dk.MaskedAdam([p], lr=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    for masks, match in [({3: torch.ones(4, 5, dtype=torch.bool)}, "mask for parameter 3"),
                         ({0: torch.ones(5, 4, dtype=torch.bool)},
                          r"state_dict\['masks'\]\[0\] has shape \(5, 4\)")]:
        bad = copy.deepcopy(state_before)
        bad["masks"] = masks
        bad["state"][0]["exp_avg"].fill_(123.0)
        _raises(match, opt.load_state_dict, bad)
        assert torch.equal(opt.state[p]["exp_avg"], state_before["state"][0]["exp_avg"])
        assert opt.masks == {}


def test_optimizer_rejects_sparse_gradients():
    p = torch.randn(4, 5, requires_grad=True)
    opt = dk.MaskedSGD([p], lr=0.1)
    p.grad = torch.randn(4, 5).to_sparse()
    before = _snapshot(p)
    _raises("param group 0, parameter 0 has a sparse gradient", opt.step)
    assert _unchanged([p], before)


def test_failed_step_counts_no_step():
    """A parameter the step refuses leaves the ones checked before it untouched, step counts
    included: the next good step is every parameter's first."""
    good, bad = torch.randn(4, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = dk.MaskedAdam([good, bad], lr=0.1)
    bad.data = bad.data.double()  # after construction, which refuses float64
    good.grad, bad.grad = torch.randn_like(good), torch.randn_like(bad)
    before = _snapshot(good)
    _raises(r"param group 0, parameter 1 has dtype torch.float64", opt.step)
    assert _unchanged([good], before)
    assert all(float(state["step"]) == 0 for state in opt.state.values())


def _two_groups(masked_cls, **kwargs):
    good, bad = torch.randn(4, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = masked_cls([{"params": [good]}, {"params": [bad]}], lr=0.1, **kwargs)
    bad.data = bad.data.double()  # after construction, which refuses float64
    good.grad, bad.grad = torch.randn_like(good), torch.randn_like(bad)
    return good, bad, opt


@pytest.mark.parametrize("masked_cls, kwargs", [
    (dk.MaskedAdam, {}), (dk.MaskedSGD, {"momentum": 0.9, "dampening": 0.3})])
def test_a_step_refused_in_a_later_group_changes_nothing(masked_cls, kwargs):
    """Group 1 refuses the step: group 0's weights, state and step counts stay as they were,
    and the next good step is group 0's first, as torch.optim's would be."""
    good, bad, opt = _two_groups(masked_cls, **kwargs)
    before = _snapshot(good)
    _raises(r"param group 1, parameter 0 has dtype torch.float64", opt.step)
    assert _unchanged([good], before) and not opt.state
    opt.param_groups.pop()  # drop the bad group, then compare one good step with torch.optim
    reference = torch.nn.Parameter(before[0].clone())
    reference.grad = good.grad.clone()
    torch_cls = torch.optim.Adam if masked_cls is dk.MaskedAdam else torch.optim.SGD
    torch_cls([reference], lr=0.1, **kwargs).step()
    opt.step()
    torch.testing.assert_close(good.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def test_dtype_error_names_the_parameter_when_named():
    model = torch.nn.Linear(3, 2)
    opt = dk.MaskedAdamW(model.named_parameters(), lr=0.1)
    model.double()  # after construction, which refuses float64
    model(torch.randn(1, 3, dtype=torch.float64)).sum().backward()
    _raises(r"param group 0, parameter 0 \('weight'\) has dtype torch.float64", opt.step)


@pytest.mark.parametrize("flag", ["amsgrad", "capturable", "differentiable"])
def test_state_dict_with_an_unsupported_flag_is_refused(flag):
    p = torch.randn(3, requires_grad=True)
    source = torch.optim.AdamW([p], lr=0.1, **{flag: True})
    if flag == "amsgrad":  # a max_exp_avg_sq in the state, as a real run leaves
        p.grad = torch.randn(3)
        source.step()
    opt = dk.MaskedAdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    before = copy.deepcopy(opt.state_dict())
    _raises(f"state_dict param group 0 uses {flag}=True", opt.load_state_dict,
            source.state_dict())
    assert opt.state_dict() == before
    _raises(f"param group 1 uses {flag}=True", opt.add_param_group,
            {"params": [torch.randn(2, requires_grad=True)], flag: True})
    assert len(opt.param_groups) == 1
