"""dsd_kernels.prune against torch.nn.utils.prune itself: the same module state after every
function, the same masks where magnitudes are untied, our tie rule where they are tied, and
the optimizer trap (state alive at pruned weights) closed by mask_optimizer_."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import dsd_kernels as dk
from dsd_kernels import prune


class _Channel(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


def _net(seed=0, dtype=torch.float32):
    """Linear, conv and linear layers (indices 0, 2, 4) on 12 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), _Channel(), nn.Conv1d(1, 3, 5), nn.Flatten(),
                         nn.Linear(48, 4)).to(dtype)


def _pairs(net):
    return [(net[0], "weight"), (net[0], "bias"), (net[2], "weight"), (net[4], "weight")]


def _hooks(module):
    return [(type(h).__name__, getattr(h, "_tensor_name", None))
            for h in module._forward_pre_hooks.values()]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Parameters, buffers (values and dtypes), state_dict keys and pruning hooks agree."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for ma, mb in zip(a.modules(), b.modules()):
        assert _hooks(ma) == _hooks(mb)
        for name in [n for n, _ in ma.named_buffers(recurse=False) if n.endswith("_mask")]:
            assert torch.equal(getattr(ma, name[:-5]), getattr(mb, name[:-5]))
    assert torch_prune.is_pruned(a) == prune.is_pruned(b)


def _snapshot(net: nn.Module) -> dict:
    """Everything bad input must leave as it was (a pruned module cannot be deep-copied)."""
    return {"state": {k: v.clone() for k, v in net.state_dict().items()},
            "parameters": [n for n, _ in net.named_parameters()],
            "hooks": [_hooks(m) for m in net.modules()]}


def assert_unchanged(net: nn.Module, snapshot: dict) -> None:
    now = _snapshot(net)
    assert list(now["state"]) == list(snapshot["state"])
    for key, value in snapshot["state"].items():
        torch.testing.assert_close(now["state"][key], value, rtol=0, atol=0, equal_nan=True)
    assert now["parameters"] == snapshot["parameters"] and now["hooks"] == snapshot["hooks"]


@pytest.mark.parametrize("amount", [0.3, 0.5, 17, 0, 1.0])
def test_global_unstructured_as_torch(amount):
    ours, theirs = _net(), _net()
    prune.global_unstructured(_pairs(ours), pruning_method=prune.L1Unstructured, amount=amount)
    torch_prune.global_unstructured(_pairs(theirs), pruning_method=torch_prune.L1Unstructured,
                                    amount=amount)
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("amount", [0.25, 9, 0.0])
def test_l1_unstructured_as_torch(amount):
    ours, theirs = _net(1), _net(1)
    for module, name in _pairs(ours):
        assert prune.l1_unstructured(module, name, amount=amount) is module
    for module, name in _pairs(theirs):
        torch_prune.l1_unstructured(module, name, amount=amount)
    assert_same_state(ours, theirs)
    x = torch.randn(2, 12)
    assert torch.equal(ours(x), theirs(x))  # the forward pre-hooks mask as torch's do


def test_repeated_pruning_importance_scores_and_remove_as_torch():
    """An iterative schedule: each round prunes a fraction of what is left, keeping the old
    mask; mixed local and global rounds, importance scores, then remove."""
    ours, theirs = _net(2), _net(2)
    gen = torch.Generator().manual_seed(3)
    scores = {1: torch.rand(ours[0].weight.shape, generator=gen)}
    for lib, net in ((prune, ours), (torch_prune, theirs)):
        lib.l1_unstructured(net[0], "weight", amount=0.2, importance_scores=scores[1])
        global_method = {"pruning_method": lib.L1Unstructured}
        lib.global_unstructured(_pairs(net), amount=0.3, **global_method)
        lib.global_unstructured(_pairs(net), amount=0.3, importance_scores={
            (net[4], "weight"): net[4].weight.detach().flip(0)}, **global_method)
        lib.l1_unstructured(net[2], "weight", amount=2)
    assert_same_state(ours, theirs)
    assert _hooks(ours[0]) == [("PruningContainer", "weight"), ("PruningContainer", "bias")]
    for lib, net in ((prune, ours), (torch_prune, theirs)):
        lib.remove(net[0], "weight")
        lib.remove(net[4], "weight")
    assert_same_state(ours, theirs)


def _stable_ranking_masks(tensors, count):
    """The oracle of the tie rule: the first `count` entries of a stable sort of |x| over the
    tensors in order (lower flat index, then earlier tensor) are pruned."""
    flat = torch.cat([t.detach().reshape(-1).abs().float() for t in tensors])
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:count]] = False
    return [m.view_as(t) for m, t in zip(keep.split([t.numel() for t in tensors]), tensors)]


def test_ties_are_pruned_in_position_order():
    torch.manual_seed(4)
    layers = [nn.Linear(9, 7), nn.Linear(7, 5)]
    with torch.no_grad():
        for layer in layers:  # magnitudes from 4 values: ties everywhere
            layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape).float() * 0.5)
    tensors = [layer.weight.detach().clone() for layer in layers]
    prune.global_unstructured([(layer, "weight") for layer in layers], amount=0.45)
    count = round(0.45 * sum(t.numel() for t in tensors))
    for layer, expected in zip(layers, _stable_ranking_masks(tensors, count)):
        assert torch.equal(layer.weight_mask.bool(), expected)
    # torch's own global_unstructured given our method: exact count, the same rule
    layer = nn.Linear(30, 30)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, 3, (30, 30)).float())
    weight = layer.weight.detach().clone()
    torch_prune.global_unstructured([(layer, "weight")], pruning_method=prune.L1Unstructured,
                                    amount=0.5)
    assert torch.equal(layer.weight_mask.bool(), _stable_ranking_masks([weight], 450)[0])


def test_half_precision_weights():
    ours, theirs = _net(5, torch.float16), _net(5, torch.float16)
    prune.global_unstructured(_pairs(ours), amount=0.4)
    torch_prune.global_unstructured(_pairs(theirs), torch_prune.L1Unstructured, amount=0.4)
    assert_same_state(ours, theirs)


@pytest.mark.slow  # trains two models side by side
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_mask_optimizer_closes_the_trap(name):
    """100 steps after pruning: with mask_optimizer_ every pruned weight_orig entry and its
    optimizer state are exactly 0; with torch alone they are not."""
    results = {}
    for masked in (False, True):
        net = _net(6)
        optimizer = (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) if name == "sgd"
                     else torch.optim.AdamW(net.parameters(), lr=1e-2))
        x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
        for step in range(100):
            if step == 5:  # prune after a few steps, so momentum / moments are alive
                prune.global_unstructured(_pairs(net)[2:], amount=0.6)
                if masked:
                    assert prune.mask_optimizer_(optimizer, net) is optimizer
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        alive = []
        for module, param in ((net[2], "weight"), (net[4], "weight")):
            pruned = getattr(module, param + "_mask") == 0
            original = getattr(module, param + "_orig")
            state = [v for k, v in optimizer.state[original].items() if k != "step"]
            alive.append(bool(original[pruned].abs().sum() > 0)
                         or any(bool(s[pruned].abs().sum() > 0) for s in state))
        results[masked] = alive
    assert results[False] == [True, True]  # the trap: pruned entries moved, state alive
    assert results[True] == [False, False]


def test_mask_optimizer_after_remove_lets_weights_regrow():
    net = _net(7)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    prune.l1_unstructured(net[4], "weight", amount=0.5)
    prune.mask_optimizer_(optimizer, net)
    assert len(optimizer.masks) == 1
    prune.remove(net[4], "weight")
    prune.mask_optimizer_(optimizer, net)
    assert optimizer.masks == {}


@pytest.mark.parametrize("call, error, message", [
    (lambda net: prune.l1_unstructured(net[0], "weight", amount=1.5), ValueError, "amount=1.5"),
    (lambda net: prune.l1_unstructured(net[0], "weight", amount=-1), ValueError, "amount=-1"),
    (lambda net: prune.l1_unstructured(net[0], "weight", amount="half"), TypeError, "amount"),
    (lambda net: prune.l1_unstructured(net[0], "weight", amount=217), ValueError,
     "more than the 216 unpruned"),
    (lambda net: prune.l1_unstructured(net[0], "weights", amount=0.5), AttributeError,
     "Linear has no parameter named 'weights'"),
    (lambda net: prune.global_unstructured([(net[0], "weight"), (net[4], "wieght")],
                                           amount=0.5), AttributeError, "'wieght'"),
    (lambda net: prune.global_unstructured(_pairs(net), amount=2.0), ValueError, "amount=2.0"),
    (lambda net: prune.global_unstructured(_pairs(net), torch_prune.RandomUnstructured,
                                           amount=0.5), TypeError, "RandomUnstructured"),
    (lambda net: prune.global_unstructured(_pairs(net), amount=0.5, n=1), TypeError,
     "amount= .and no other keyword"),
    (lambda net: prune.global_unstructured([(net[0], "weight", 1)], amount=0.5), TypeError,
     "parameters must hold .module, name. pairs"),
    (lambda net: prune.l1_unstructured(net[2], "weight", amount=0.5, importance_scores=torch.rand(
        3, 1, 5, dtype=torch.float64)), ValueError,
     r"^the importance scores of Conv1d.weight have dtype torch.float64; .* scores.float\(\)"),
    (lambda net: prune.global_unstructured(
        _pairs(net), amount=0.5, importance_scores={(net[4], "weight"): torch.randint(
            0, 9, (4, 48))}), ValueError, r"importance scores of Linear.weight have dtype "
                                          "torch.int64"),
])
def test_bad_input_leaves_the_module_unmodified(call, error, message):
    net = _net(8)
    prune.l1_unstructured(net[0], "weight", amount=0.1)  # a pruned module stays as it was too
    before = _snapshot(net)
    with pytest.raises(error, match=message):
        call(net)
    assert_unchanged(net, before)


def test_non_finite_weights_are_refused_before_touching_the_module():
    net = _net(9)
    prune.l1_unstructured(net[4], "weight", amount=0.2)
    with torch.no_grad():  # `weight`, as the last forward left it, is what is ranked
        net[4].weight_orig[0, 0] = float("nan")
        net[4].weight[0, 0] = float("nan")
    before = _snapshot(net)
    with pytest.raises(ValueError, match="Linear.weight.*NaN"):
        prune.l1_unstructured(net[4], "weight", amount=0.2)
    assert_unchanged(net, before)


def test_meta_modules_are_pruned_as_torch_prunes_them():
    """A model on the meta device (no values: built for its shapes): pruned to the same module
    state as torch's l1_unstructured leaves, and the ops give meta results of the right kind."""
    ours, theirs = nn.Linear(4, 3, device="meta"), nn.Linear(4, 3, device="meta")
    prune.l1_unstructured(ours, "weight", amount=0.5)
    torch_prune.l1_unstructured(theirs, "weight", amount=0.5)
    for name in ("weight", "weight_orig", "weight_mask"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), name
    assert _hooks(ours) == _hooks(theirs)
    xs = [torch.empty(5, device="meta"), torch.empty(2, 3, device="meta", dtype=torch.float16)]
    threshold = dk.kth_smallest_abs(xs, 4)
    assert (threshold.shape, threshold.dtype, threshold.device.type) == ((), torch.float32, "meta")
    assert dk.kth_smallest_abs(xs, [2, 3]).shape == (2,)
    masks = dk.magnitude_masks(xs, 0.5)
    assert [(m.shape, m.dtype, m.device.type) for m in masks] == \
        [((5,), torch.bool, "meta"), ((2, 3), torch.bool, "meta")]


def test_global_unstructured_takes_any_pair():
    """torch unpacks each (module, name) pair: a list works as a tuple does, importance
    scores still keyed by the tuple."""
    ours, theirs = _net(4), _net(4)
    scores = {(ours[2], "weight"): torch.rand(3, 1, 5, generator=torch.Generator().manual_seed(0))}
    prune.global_unstructured([list(pair) for pair in _pairs(ours)], amount=0.4,
                              importance_scores=scores)
    torch_prune.global_unstructured(
        [list(pair) for pair in _pairs(theirs)], pruning_method=torch_prune.L1Unstructured,
        amount=0.4, importance_scores={(theirs[2], "weight"): scores[(ours[2], "weight")]})
    assert_same_state(ours, theirs)


def test_torchs_own_class_is_accepted_after_the_drop_in_replaces_it(monkeypatch):
    torchs = torch_prune.L1Unstructured
    monkeypatch.setattr(torch_prune, "L1Unstructured", prune.L1Unstructured)  # the drop-in
    ours, theirs = _net(5), _net(5)
    prune.global_unstructured(_pairs(ours), pruning_method=torchs, amount=0.3)
    prune.global_unstructured(_pairs(theirs), pruning_method=prune.L1Unstructured, amount=0.3)
    assert_same_state(ours, theirs)


@pytest.mark.slow  # a Lightning fit
def test_lightning_model_pruning_with_our_method(tmp_path):
    """Lightning's ModelPruning given our pruning method prunes exactly the amount asked, by
    our tie rule (lr 0 keeps the tied weights as they are until the pruning)."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net(10)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.TensorDataset(torch.randn(64, 12), torch.randint(0, 4, (64,)))
    module = Module()
    layers = [(module.net[0], "weight"), (module.net[2], "weight"), (module.net[4], "weight")]
    with torch.no_grad():
        for m, n in layers:
            getattr(m, n).copy_(torch.randint(-2, 3, getattr(m, n).shape) * 0.25)
    tensors = [getattr(m, n).detach().clone() for m, n in layers]
    pruning = pl.callbacks.ModelPruning(prune.L1Unstructured, parameters_to_prune=layers,
                                        amount=0.5, use_global_unstructured=True,
                                        make_pruning_permanent=False, verbose=0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[pruning], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    expected = _stable_ranking_masks(tensors, round(0.5 * sum(t.numel() for t in tensors)))
    for (m, n), keep in zip(layers, expected):
        assert torch.equal(getattr(m, n + "_mask").bool(), keep)


# N:M structured pruning.

def _nm_oracle(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Independent N:M keep-mask: numpy over groups of m along dim 1; a stable ascending sort
    of |t| puts the lower index first among ties, and the first m - n are pruned."""
    a = np.moveaxis(np.abs(t.detach().float().numpy()), 1, -1)
    groups = a.reshape(*a.shape[:-1], -1, m)
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(groups, axis=-1, kind="stable")[..., :m - n], False,
                      axis=-1)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(keep.reshape(a.shape), -1, 1)))


def _kept_per_group(mask: torch.Tensor, m: int) -> torch.Tensor:
    moved = (mask != 0).movedim(1, -1)
    return moved.reshape(*moved.shape[:-1], -1, m).sum(-1)


def _tied(module: nn.Module) -> nn.Module:
    """Weights of few values (ties in most groups, signed zeros among them)."""
    with torch.no_grad():
        module.weight.copy_(torch.randint(-2, 3, module.weight.shape) * 0.5)
    return module


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ((1, 4), 1, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_nm_structured_leaves_torchs_state_with_the_oracles_mask(pattern, n, m, layer):
    torch.manual_seed(0)
    make = {"linear": lambda: nn.Linear(16, 6), "conv2d": lambda: nn.Conv2d(8, 3, 2)}[layer]
    ours, theirs = _tied(make()), make()
    theirs.load_state_dict(ours.state_dict())
    weight = ours.weight.detach().clone()
    assert prune.nm_structured(ours, "weight", pattern=pattern) is ours
    torch_prune.l1_unstructured(theirs, "weight", amount=0.5)  # torch's state, another mask
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.weight_mask.dtype == theirs.weight_mask.dtype
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert _hooks(ours) == [("NMStructured", "weight")]
    keep = _nm_oracle(weight, n, m)
    assert torch.equal(ours.weight_mask.bool(), keep)
    assert (_kept_per_group(ours.weight_mask, m) == n).all()
    assert torch.equal(ours.weight, weight * keep)
    x = torch.randn(2, *((16,) if layer == "linear" else (8, 3, 3)))
    reference = (nn.functional.linear(x, weight * keep, ours.bias) if layer == "linear" else
                 nn.functional.conv2d(x, weight * keep, ours.bias))
    torch.testing.assert_close(ours(x), reference, rtol=0, atol=0)
    prune.remove(ours, "weight")
    torch_prune.remove(theirs, "weight")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert not ours._forward_pre_hooks
    assert torch.equal(ours.weight.detach(), weight * keep)


def test_nm_structured_composes_with_torchs_pruning_on_the_masked_weight():
    """After an L1 mask the pattern is computed on the weight as that mask leaves it and
    the old mask is kept: at most N per group; later torch pruning keeps it at most N."""
    torch.manual_seed(1)
    linear = _tied(nn.Linear(16, 8))
    weight = linear.weight.detach().clone()
    torch_prune.l1_unstructured(linear, "weight", amount=0.4)
    old = linear.weight_mask.bool()
    prune.nm_structured(linear, "weight", "2:4")
    hook = next(iter(linear._forward_pre_hooks.values()))
    assert isinstance(hook, torch_prune.PruningContainer)
    assert [type(p).__name__ for p in hook._pruning_methods] == ["L1Unstructured",
                                                                 "NMStructured"]
    expected = old & _nm_oracle(weight * old, 2, 4)
    assert torch.equal(linear.weight_mask.bool(), expected)
    assert (_kept_per_group(linear.weight_mask, 4) <= 2).all()
    groups_with_two = _kept_per_group(old & (weight != 0), 4) >= 2
    assert (_kept_per_group(linear.weight_mask, 4)[groups_with_two] == 2).all()
    torch_prune.random_unstructured(linear, "weight", amount=0.3)
    assert (_kept_per_group(linear.weight_mask, 4) <= 2).all()
    assert not (linear.weight_mask.bool() & ~expected).any()
    # The class itself, as a pruning_method of torch's apply and containers.
    other = nn.Linear(8, 4)
    prune.NMStructured.apply(other, "weight", pattern="1:4")
    assert torch.equal(other.weight_mask.bool(), _nm_oracle(other.weight_orig, 1, 4))
    with pytest.raises(TypeError, match="unstructured"):  # torch's own refusal
        torch_prune.global_unstructured([(other, "weight")], pruning_method=prune.NMStructured,
                                        pattern="2:4")


@pytest.mark.parametrize("call, error, message", [
    (lambda net: prune.nm_structured(net[2], "weight"), ValueError, r"\(3, 1, 5\).*dim 1"),
    (lambda net: prune.nm_structured(net[0], "weight", "4:2"), ValueError, "pattern"),
    (lambda net: prune.nm_structured(net[0], "weight", "2:4",
                                     importance_scores=torch.ones(20, 12, dtype=torch.float64)),
     ValueError, "dtype"),
    (lambda net: prune.nm_structured(net[0], "bias"), ValueError, "2\\+ dims"),
    (lambda net: prune.nm_structured(net[0], "nope"), AttributeError, "nope"),
    (lambda net: prune.nm_structured_model(net, "2:3"), ValueError, "NaN"),
])
def test_nm_bad_input_leaves_the_module_unmodified(call, error, message):
    net = _net(2)
    prune.l1_unstructured(net[4], "weight", amount=0.25)
    net[0].weight.data[0, 0] = float("nan")
    before = _snapshot(net)
    with pytest.raises(error, match=message):
        call(net)
    assert_unchanged(net, before)


def test_nm_nan_is_refused_unless_an_earlier_mask_pruned_it():
    net = _net(3)
    net[0].weight.data[1, 2] = float("nan")
    before = _snapshot(net)
    for call in (lambda: prune.nm_structured(net[0], "weight"),
                 lambda: prune.nm_structured_model(net)):
        with pytest.raises(ValueError, match="NaN"):
            call()
        assert_unchanged(net, before)
    mask = torch.ones(20, 12)
    mask[1, 2] = 0
    prune.custom_from_mask(net[0], "weight", mask)
    prune.nm_structured(net[0], "weight")
    assert net[0].weight_mask[1, 2] == 0 and (_kept_per_group(net[0].weight_mask, 4) <= 2).all()


def test_nm_structured_model_prunes_every_eligible_weight_in_one_pass(monkeypatch):
    ours, theirs = _net(4), _net(4)
    for net in (ours, theirs):
        torch.manual_seed(4)
        _tied(net[0])
        _tied(net[4])
        prune.l1_unstructured(net[4], "weight", amount=0.5)  # composed with, as nm_structured
    calls = []
    real = prune.nm_masks
    monkeypatch.setattr(prune, "nm_masks", lambda *a, **k: calls.append(a) or real(*a, **k))
    dense = prune.nm_structured_model(ours, "2:4")
    assert len(calls) == 1 and len(calls[0][0]) == 2  # both eligible weights, one call
    assert list(dense) == ["2.weight"] and "dim 1 (1) is not a multiple of 4" in dense["2.weight"]
    assert not prune.is_pruned(ours[2])
    monkeypatch.setattr(prune, "nm_masks", real)
    for i in (0, 4):
        prune.nm_structured(theirs[i], "weight", "2:4")
    for i in (0, 4):
        assert torch.equal(ours[i].weight_mask, theirs[i].weight_mask)
        assert torch.equal(ours[i].weight, theirs[i].weight)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert _hooks(ours[0]) == [("CustomFromMask", "weight")]  # as global_unstructured's
    assert _hooks(ours[4]) == [("PruningContainer", "weight")]
    assert prune.nm_structured_model(nn.Sequential(nn.Linear(3, 2))) == {
        "0.weight": "shape (2, 3): dim 1 (3) is not a multiple of 4"}
