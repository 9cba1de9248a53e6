"""The Triton backend's table caches (tables.Cache), with the optimizers' plans on top:
whatever changed between two calls (new gradients, masks, state, parameters, dtypes, sizes,
layouts), a call with cached tables and plans gives the bits of the same call with both built
afresh; and the steady state of a training loop (same tensors; gradients where they were)
builds and uploads nothing.

Runs on CUDA when a GPU is present, else in Triton's interpreter (see test_triton_backend).
"""

import copy

import pytest
import torch
from conftest import TOLERANCES

import dsd_kernels as dk
from dsd_kernels import host
from dsd_kernels.backends import torch_ref
from dsd_kernels.optim import masked

import _oracle

pytest.importorskip("dsd_kernels.backends.triton")

from test_triton_backend import DEVICE  # noqa: E402

from dsd_kernels.backends.triton import mask, optim, tables, threshold  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_backend")

CACHES = (optim._TABLES, threshold._TABLES, mask._TABLES, mask._FILL_TABLES)


def _describe_in_cpp():
    """host.describe_tensors as the C++ library installs it (the C++ backend builds in CI)."""
    if "cpp" not in dk.available_backends():
        pytest.skip("the C++ backend is not available")
    assert host.describe_tensors is not host.describe_in_python
    return host.describe_tensors


@pytest.fixture(params=["cpp", "python"])
def describe(request, monkeypatch):
    """Cache keys read by the C++ library, and by the Python fallback."""
    function = _describe_in_cpp() if request.param == "cpp" else host.describe_in_python
    monkeypatch.setattr(host, "describe_tensors", function)
    _clear_caches()
    return function


def test_keys_differ_exactly_when_a_tensor_moved_or_changed_geometry(describe):
    base = torch.zeros(64)
    a, b = base[:12].view(3, 4), torch.ones(12)
    same = [[a, None], [b]]
    other = [  # each differs from `same` in one thing a table is built from
        [[a.clone(), None], [b]],                       # an address
        [[base[:12].view(4, 3), None], [b]],            # sizes
        [[base[:12].view(4, 3).t(), None], [b]],        # strides (same sizes)
        [[base[:24].view(torch.float16)[:12].view(3, 4), None], [b]],  # dtype, same address
        [[a, a], [b]],                                  # None or a tensor
        [[a], [None, b]],                               # which list a tensor is in
        [[a, None], [b], []],                           # how many lists
        [[a, None], [torch.ones(12, dtype=torch.bool)]],  # a mask's dtype
        [[a, None], [b.to("meta")]],                    # device
    ]
    key = describe(same)
    assert describe([[a, None], [b]]) == key and hash(describe(same)) == hash(key)
    assert describe([(a, None), (b,)]) == key  # tuples read as lists
    keys = [describe(lists) for lists in other]
    assert all(k != key for k in keys)
    assert len(set(keys)) == len(keys)


def test_keys_refuse_what_is_not_a_tensor():
    describe_tensors = _describe_in_cpp()
    with pytest.raises(TypeError):
        describe_tensors([[torch.zeros(2), 3]])
    with pytest.raises(TypeError):
        describe_tensors([torch.zeros(2)])


def _clear_caches():
    for cache in CACHES:
        cache.clear()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


def _assert_same_bits(got: list, expected: list):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, f"tensor {i}"
        assert torch.equal(_bits(g), _bits(e)), f"tensor {i} differs"


def _scripted_training(optimizer_class, config, fresh_tables: bool) -> list:
    """Snapshots of every parameter and state tensor after each step of a run that makes
    every change a step's tables depend on; with fresh_tables, every step plans and builds
    its tables afresh (the optimizer's plans and the caches are dropped before it)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator).to(dtype).to(DEVICE)

    params = [torch.nn.Parameter(t) for t in (
        randn(4, 3, 3, 3).to(memory_format=torch.channels_last), randn(300),
        randn(7, 5, dtype=torch.float16), randn(5))]
    opt = optimizer_class(params[:3], **config)
    old_grads, snapshots = [], []

    def step(new_grads=True):
        for p in params:
            if new_grads or p.grad is None:
                # Old gradients stay alive, so the new ones lie at new addresses; contiguous
                # gradients of the channels_last weight are staged into its layout.
                old_grads.append(p.grad)
                p.grad = randn(*p.shape, dtype=p.dtype)
            else:  # where the last backward put them, as the CUDA allocator usually does
                p.grad.copy_(randn(*p.shape, dtype=p.dtype))
        if fresh_tables:
            _clear_caches()
            opt._plans = ()
        opt.step()
        snapshots.append([t.clone() for p in params for t in
                          [p, *(s for s in opt.state.get(p, {}).values() if s.dim())]])

    def masks(seed):
        g = torch.Generator().manual_seed(seed)
        return {p: (torch.rand(p.shape, generator=g) > 0.3).to(DEVICE) for p in params[:2]}

    step()  # creates the state
    step()  # new gradients at new addresses
    step(new_grads=False)
    opt.set_masks(masks(1))
    step()
    opt.set_masks(masks(2))  # other masks, at other addresses
    step(new_grads=False)
    for group in opt.param_groups:  # runtime arguments only
        group.update(lr=group["lr"] * 0.5, weight_decay=0.2)
        if "betas" in group:
            group["betas"] = (0.8, 0.99)
    step(new_grads=False)
    opt.clear_masks()
    step()
    params[1].data = params[1].data.clone()  # the same parameter, new storage
    step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors, masks restored
    step()
    params[2].data = params[2].data.float()  # a new dtype; loading casts the state to it
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step()
    opt.add_param_group({"params": [params[3]], "lr": 0.05})
    step()
    step(new_grads=False)
    return snapshots


@pytest.mark.parametrize("optimizer", [
    (dk.MaskedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    (dk.MaskedSGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
], ids=["adamw", "sgd-momentum"])
def test_cached_steps_match_fresh_tables_through_every_change(optimizer, describe, monkeypatch):
    optimizer_class, config = optimizer
    _clear_caches()
    cached = _scripted_training(optimizer_class, config, fresh_tables=False)
    with monkeypatch.context() as patch:  # Adam's step counts added tensor by tensor
        patch.setattr(masked, "_shared_counts", lambda bucket: None)
        fresh = _scripted_training(optimizer_class, config, fresh_tables=True)
    dk.use_backend("torch")  # the oracle, within fp32 rounding
    reference = _scripted_training(optimizer_class, config, fresh_tables=False)
    for step, (got, expected, close) in enumerate(zip(cached, fresh, reference)):
        assert len(got) == len(expected) == len(close), f"step {step}"
        _assert_same_bits(got, expected)
        for i, (g, c) in enumerate(zip(got, close)):
            torch.testing.assert_close(g, c, **TOLERANCES[g.dtype], msg=f"step {step}, {i}")


def _counted_uploads(monkeypatch) -> list:
    """Every tables.upload of host tables to the device, by the number of tables."""
    uploads, upload = [], tables.upload

    def counted(device, *host):
        uploads.append(len(host))
        return upload(device, *host)

    monkeypatch.setattr(tables, "upload", counted)
    return uploads


def test_steady_state_builds_and_uploads_nothing(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (1000, 10, 3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = dk.MaskedAdamW(params, lr=1e-3)
    opt.set_masks({params[0]: torch.rand(1000, device=DEVICE) > 0.5})
    opt.step()
    opt.step()  # the first step created the state; this one's plan is kept
    plan = opt._plans[0]
    builds, uploads = optim._TABLES.builds, _counted_uploads(monkeypatch)
    for lr, beta1 in [(5e-4, 0.9), (2e-4, 0.8), (1e-4, 0.7)]:  # a schedule of lr and betas
        opt.param_groups[0].update(lr=lr, betas=(beta1, 0.99), weight_decay=lr)
        opt.step()
    assert optim._TABLES.builds == builds and uploads == [] and opt._plans[0] is plan
    # zero_grad(set_to_none=True) and a backward: only the gradients' table is sent again
    old_grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(p.grad is not g for p, g in zip(params, old_grads))
    assert optim._TABLES.builds == builds and uploads == [1] and opt._plans[0] is plan


def test_masks_and_thresholds_reuse_tables_of_the_same_tensors(monkeypatch):
    # A gradual pruning schedule: the same weights, trained in place between calls.
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=generator).to(DEVICE) for shape in [(40, 30), (500,)]]
    xs.append(torch.randn(6, 7, generator=generator).half().to(DEVICE))
    caches = (threshold._TABLES, mask._TABLES, mask._FILL_TABLES)
    builds = None
    for sparsity in (0.2, 0.5, 0.8):
        for scope in ("layer", "global"):
            masks = dk.magnitude_masks(xs, sparsity, scope)
            expected = torch_ref.magnitude_masks(xs, _oracle.counts(xs, sparsity, scope), scope)
            assert all(torch.equal(m, e) for m, e in zip(masks, expected))
        k = int(sparsity * xs[0].numel())
        assert torch.equal(dk.kth_smallest_abs(xs[0], k), torch_ref.kth_smallest_abs([xs[0]], k))
        dk.apply_masks_(xs, masks)
        if builds is None:
            builds = [cache.builds for cache in caches]
        for x in xs:
            x.add_(torch.randn(x.shape, generator=generator).to(x.dtype).to(DEVICE))
    assert [cache.builds for cache in caches] == builds
    # New storage for the same weights: built again, right again.
    xs[1] = xs[1].clone()
    masks = dk.magnitude_masks(xs, 0.5, "layer")
    expected = torch_ref.magnitude_masks(xs, _oracle.counts(xs, 0.5, "layer"), "layer")
    assert all(torch.equal(m, e) for m, e in zip(masks, expected))
    assert [cache.builds for cache in caches] == [builds[0] + 1, builds[1] + 1, builds[2]]


_ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "mask")
# (elements, shape, dtype, roles laid out transposed) of the views at the start of one buffer
# per role: each differs from the one before in one of size, dtype, shape or one tensor's
# strides. Transposing some roles and not others makes the step stage copies (twice in a
# row: a table pointing at the first call's copies must not be reused).
_GEOMETRIES = [(600, (600,), torch.float32, ()), (300, (300,), torch.float32, ()),
               (600, (600,), torch.bfloat16, ()), (600, (30, 20), torch.float32, ()),
               (600, (30, 20), torch.float32, ("param",)),
               (600, (30, 20), torch.float32, ("param",)),
               (600, (30, 20), torch.float32, ("grad",)),
               (600, (30, 20), torch.float32, ("exp_avg",)),
               (600, (30, 20), torch.float32, ("mask",)),
               (600, (30, 20), torch.float32, _ROLES)]


def _view(buffer, numel, shape, dtype, transposed):
    if buffer.dtype != torch.bool:
        buffer = buffer.view(dtype)
    if transposed:
        return buffer[:numel].view(shape[::-1]).t()
    return buffer[:numel].view(shape)


def test_same_address_other_geometry_builds_again(describe):
    # Every tensor of a call (parameter, gradient, state, mask) is a view at the address of
    # the last call's: a table reused for another size, dtype or layout would read or write
    # the wrong elements. The whole buffers after each call must match the same calls on
    # fresh tables (and other addresses) bitwise.
    buffers = [torch.zeros(1200, device=DEVICE) for _ in range(4)]
    buffers.append(torch.zeros(1200, dtype=torch.bool, device=DEVICE))
    _clear_caches()
    runs = {}
    for fresh_tables in (False, True):
        runs[fresh_tables] = results = []
        run_buffers = [b.clone() for b in buffers]
        for numel, shape, dtype, transposed in _GEOMETRIES:
            if fresh_tables:  # the same contents at other addresses, tables built afresh
                _clear_caches()
                run_buffers = [b.clone() for b in run_buffers]
            p, grad, exp_avg, exp_avg_sq, mask = (
                _view(b, numel, shape, dtype, role in transposed)
                for b, role in zip(run_buffers, _ROLES))
            for t, low, high in [(p, -1, 1), (grad, 0.5, -0.5), (exp_avg, 0, 0.1),
                                 (exp_avg_sq, 0, 0.01)]:
                t.copy_(torch.linspace(low, high, numel).view(shape))
            mask.copy_((torch.arange(numel) % 3 != 0).view(shape))
            dk.masked_adam_([p], [grad], [exp_avg], [exp_avg_sq], [mask], 2, lr=0.1, beta1=0.9,
                            beta2=0.99, eps=1e-8)
            masks = dk.magnitude_masks(p, 0.4)
            dk.apply_masks_([exp_avg], masks)
            results.append([*(b.clone() for b in run_buffers), *masks,
                            dk.kth_smallest_abs(p, numel // 3)])
    for call, (got, expected) in enumerate(zip(runs[False], runs[True])):
        assert len(got) == len(expected), f"call {call}"
        _assert_same_bits(got, expected)
