"""The DSD runner inside a user's own loop: phase switches, exact sparsity, re-dense restart,
optimizer conversion, prunable-parameter selection, plan validation."""

import copy
import math

import pytest
import torch
from torch import nn

import dsd_kernels as dk
from dsd import DSD, Phase, Plan, prunable_parameters
from dsd_kernels.optim import step_lr

from _runs import resumed


class Net(nn.Module):
    """Every kind of layer the default selection must tell apart."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.gru = nn.GRU(8, 7, batch_first=True)
        self.head = nn.Linear(7, 5)

    def forward(self, tokens):
        x = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        steps, _ = self.gru(self.norm(torch.relu(x)))
        return self.head(steps[:, -1])


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return (torch.randint(0, 11, (16, 9), generator=generator),
            torch.randint(0, 5, (16,), generator=generator))


def _train_step(model, optimizer, step):
    tokens, labels = _batch(step)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(tokens), labels).backward()
    optimizer.step()


def _states(optimizer, p):
    names = ("momentum_buffer",) if isinstance(optimizer, torch.optim.SGD) else \
        ("exp_avg", "exp_avg_sq")
    return [optimizer.state[p][name] for name in names if name in optimizer.state[p]]


def test_default_prunable_parameters_are_layer_weights_only():
    names = [name for name, _ in prunable_parameters(Net())]
    assert names == ["embed.weight", "conv.weight", "gru.weight_ih_l0", "gru.weight_hh_l0",
                     "head.weight"]


def test_include_replaces_and_exclude_removes():
    model = Net()
    assert [n for n, _ in prunable_parameters(model, include=["head.*"])] == \
        ["head.weight", "head.bias"]
    assert [n for n, _ in prunable_parameters(model, exclude=["gru.*", "embed.weight"])] == \
        ["conv.weight", "head.weight"]
    with pytest.raises(ValueError, match="'hed.weight' matches no parameter"):
        prunable_parameters(model, exclude=["hed.weight"])
    with pytest.raises(ValueError, match="no prunable parameter"):
        prunable_parameters(model, exclude=["*"])


def test_frozen_parameters_are_not_pruned_and_an_include_of_them_is_refused():
    model = Net()
    model.conv.requires_grad_(False)
    names = [name for name, _ in prunable_parameters(model)]
    assert names == ["embed.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "head.weight"]
    with pytest.raises(ValueError, match=r"include selects frozen parameters .*: conv.weight;"):
        prunable_parameters(model, include=["*.weight"])
    assert "conv.weight" not in dict(prunable_parameters(model, include=["*.weight"],
                                                         exclude=["conv.*"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSD(model, optimizer, Plan.dsd(1, 1, 1, sparsity=0.5))
    dsd.epoch_start(1)
    assert optimizer.masks and model.conv.weight.count_nonzero() == model.conv.weight.numel()


def test_one_pattern_string_is_one_pattern():
    plan = Plan.dsd(1, 1, 1, include="head.*", exclude="*.bias")
    assert plan.include == ("head.*",) and plan.exclude == ("*.bias",)
    assert [n for n, _ in prunable_parameters(Net(), include="head.*")] == \
        ["head.weight", "head.bias"]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_phase_switches_in_a_step_based_loop(kind):
    torch.manual_seed(0)
    model = Net()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if kind == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.01))
    plan = Plan.dsd(3, 4, 3, sparsity=0.3, unit="steps")
    dsd = DSD(model, optimizer, plan)
    optimizer = dsd.optimizer
    named = dict(dsd.named_prunable)
    biases = {n: p for n, p in model.named_parameters() if n not in named}
    pruned = {}
    for step in range(plan.total):
        switched = dsd.step_start(step)
        assert switched == (step in (0, 3, 7))
        if step == 3:  # just pruned: exactly floor(0.3 N) zeros per tensor, state zero too
            for name, p in named.items():
                pruned[name] = p.detach() == 0
                assert pruned[name].sum().item() == math.floor(0.3 * p.numel()), name
                assert torch.equal(optimizer.masks[p], ~pruned[name])
                for state in _states(optimizer, p):
                    assert state[pruned[name]].abs().sum().item() == 0
        if step == 7:  # re-dense: mask lifted, pruned weights and their state still zero
            assert optimizer.masks == {}
            assert step_lr(optimizer.param_groups[0]) == pytest.approx(
                (0.1 if kind == "sgd" else 0.01) * 0.1)
            before = {name: p.detach().clone() for name, p in named.items()}
            for name, p in named.items():
                assert before[name][pruned[name]].abs().sum().item() == 0
                for state in _states(optimizer, p):
                    assert state[pruned[name]].abs().sum().item() == 0
        _train_step(model, optimizer, step)
        if 3 <= step < 7:  # throughout the sparse phase: the same entries, exactly zero
            for name, p in named.items():
                assert torch.equal(p.detach() == 0, pruned[name]), (step, name)
        if step == 7:  # pruned weights restart from 0 as a fresh optimizer would move them
            for name, p in named.items():
                grad = p.grad[pruned[name]]
                lr = step_lr(optimizer.param_groups[0])
                if kind == "sgd":  # zero momentum: the first step is -lr * grad
                    expected = -lr * grad
                else:  # zero moments: Adam's first-step update, with the shared step count
                    t = optimizer.state[p]["step"].item()
                    m, v = 0.1 * grad / (1 - 0.9 ** t), 0.001 * grad ** 2 / (1 - 0.999 ** t)
                    expected = -lr * m / (v.sqrt() + 1e-8)
                torch.testing.assert_close(p.detach()[pruned[name]], expected,
                                           rtol=1e-4, atol=1e-7)
            # zero sparsity: the weights that had gradients left zero
            assert all((p.detach() == 0).float().mean() < 0.05 for name, p in named.items()
                       if name != "embed.weight")  # embedding rows get gradients only if used
    assert all((b.detach() != 0).all() for n, b in biases.items() if "norm" not in n)


def test_global_scope_prunes_exactly_over_all_tensors():
    torch.manual_seed(1)
    model = Net()
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1),
              Plan.dsd(1, 1, 1, sparsity=0.6, scope="global"))
    dsd.epoch_start(1)
    total = sum(p.numel() for _, p in dsd.named_prunable)
    zeros = sum((p == 0).sum().item() for _, p in dsd.named_prunable)
    assert zeros == math.floor(0.6 * total)
    per_layer = dsd.sparsity()
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # ranked jointly


def test_iterated_plan_scales_lr_at_each_redense():
    model = nn.Linear(4, 3)
    plan = Plan.dsd(1, 1, 1, sparsity=0.5, iterations=2, redense_lr_factor=0.5)
    assert [p.kind for p in plan.phases] == ["dense", "sparse", "dense", "sparse", "dense"]
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.8), plan)
    lrs = []
    for epoch in range(plan.total):
        dsd.epoch_start(epoch)
        lrs.append(step_lr(dsd.optimizer.param_groups[0]))
    assert lrs == [0.8, 0.8, 0.4, 0.4, 0.2]


def test_conversion_in_place_keeps_groups_and_state():
    torch.manual_seed(2)
    model = Net()
    original = torch.optim.AdamW([{"params": model.head.parameters(), "lr": 0.05},
                                  {"params": [p for n, p in model.named_parameters()
                                              if not n.startswith("head.")]}],
                                 lr=0.01, weight_decay=0.1)
    _train_step(model, original, 0)
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in original.state.items()}
    dsd = DSD(model, original, Plan.dsd(1, 1, 1))
    assert dsd.optimizer is original and isinstance(original, dk.MaskedAdamW)
    assert [g["lr"] for g in original.param_groups] == [0.05, 0.01]
    assert original.param_groups[1]["weight_decay"] == 0.1
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(original.state[p][name], state[p][name])


def test_an_element_wise_optimizer_takes_the_general_masked_step():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    optimizer = torch.optim.Rprop(model.parameters(), lr=0.01)
    dsd = DSD(model, optimizer, Plan.dsd(1, 1, 1, sparsity=0.5, redense_lr_factor=0.1))
    assert isinstance(optimizer, torch.optim.Rprop) and type(optimizer).__name__ == "MaskedRprop"
    pruned = None
    for epoch in range(dsd.plan.total):
        dsd.epoch_start(epoch)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(5, 6)).sum().backward()
            optimizer.step()
        if dsd.phase.kind == "sparse":
            pruned = model.weight.detach() == 0
            assert int(pruned.sum()) == 12
            step_size = optimizer.state[model.weight]["step_size"]
            assert (step_size[pruned] == torch.tensor(0.01)).all()
    assert pruned is not None and (model.weight.detach()[pruned] != 0).any()  # regrown


def test_unsupported_optimizers_are_rejected():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="SparseAdam: it takes sparse gradients"):
        DSD(model, torch.optim.SparseAdam(model.parameters()), Plan.dsd(1, 1, 1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim optimizer"):
        DSD(model, None, Plan.dsd(1, 1, 1))
    relative = torch.optim.SGD(model.parameters(), lr=0.1)
    relative.param_groups[0]["lr"] = None  # an optimizer that sets its own step size
    with pytest.raises(ValueError, match="lr=None, which the plan's lr scale 0.1 cannot"):
        DSD(model, relative, Plan.dsd(1, 1, 1, redense_lr_factor=0.1))
    assert type(relative) is torch.optim.SGD
    other = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in the optimizer: weight"):
        DSD(model, other, Plan.dsd(1, 1, 1))
    assert type(other) is torch.optim.SGD  # refused: left as it was


def test_phases_only_go_forward_within_the_plan():
    model = nn.Linear(3, 2)
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), Plan.dsd(2, 2, 2))
    with pytest.raises(ValueError, match="counts epochs: call dsd.epoch_start"):
        dsd.step_start(0)
    dsd.epoch_start(3)  # jumping ahead enters the phases in between
    assert dsd.phase_index == 1 and dsd.optimizer.masks
    with pytest.raises(ValueError, match="phases only go forward"):
        dsd.epoch_start(0)
    with pytest.raises(ValueError, match="outside the plan's 6 epochs"):
        dsd.epoch_start(6)


@pytest.mark.parametrize("make, message", [
    (lambda: Phase("sparse", 3, sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (lambda: Phase("sparse", 3, sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
    (lambda: Phase("dense", 0), "at least 1 epoch"),
    (lambda: Phase("pruned", 3), "phase kind"),
    (lambda: Plan(()), "at least one phase"),
    (lambda: Plan.dsd(5, 5, 5, scope="model"), "scope must be"),
    (lambda: Plan.dsd(5, 5, 5, redense_lr_factor=0), "redense_lr_factor"),
    (lambda: Plan.dsd(5, 5, 5, iterations=0), "iterations must be"),
    (lambda: Plan.dsd(5, 5, 5, include=["fc.weight", 3]), "include patterns must be .* got 3"),
    (lambda: Plan.dsd(5, 5, 5, exclude=[""]), "exclude patterns must be non-empty"),
    (lambda: Plan.dsd(5, 5, 5, exclude=None), "exclude must be a pattern or a list"),
    (lambda: Plan.from_lengths("10,10"), "lengths must be a list of ints"),
])
def test_plan_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_user_epoch_loop_with_a_dataloader():
    """The recipe of docs/training.md, Your own loop: a few calls added to an ordinary loop."""
    torch.manual_seed(3)
    x = torch.randn(256, 10)
    y = (x[:, :5].sum(1) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    keys = list(model.state_dict())
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
              Plan.dsd(4, 4, 4, sparsity=0.5))
    optimizer = dsd.optimizer
    kinds = []
    for epoch in range(dsd.plan.total):
        dsd.epoch_start(epoch)
        kinds.append(dsd.phase.kind)
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        if dsd.phase.kind == "sparse":
            assert all(s == 0.5 for s in dsd.sparsity().values())
    assert kinds == ["dense"] * 4 + ["sparse"] * 4 + ["dense"] * 4
    assert list(model.state_dict()) == keys  # no masks or hooks left in the model
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_user_checkpoint_mid_sparse_phase_restores_the_masks():
    torch.manual_seed(4)
    model = Net()
    plan = Plan.dsd(1, 3, 1, sparsity=0.4, unit="steps")
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plan)
    for step in range(2):
        dsd.step_start(step)
        _train_step(model, dsd.optimizer, step)
    # deepcopy stands for the trip through a file: state_dicts share the live tensors
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": dsd.optimizer.state_dict(),
                           "dsd": dsd.state_dict()})

    restored_model = Net()
    restored_model.load_state_dict(saved["model"])
    restored = DSD(restored_model, torch.optim.SGD(restored_model.parameters(), lr=0.1,
                                                   momentum=0.9), plan)
    restored.optimizer.load_state_dict(saved["optimizer"])
    restored.load_state_dict(saved["dsd"])
    for step in range(2, plan.total):
        for runner, net in ((dsd, model), (restored, restored_model)):
            runner.step_start(step)
            _train_step(net, runner.optimizer, step)
        if step < 4:  # still sparse after the restore: the same entries stay exactly zero
            assert restored.sparsity() == dsd.sparsity()
            assert all(abs(s - 0.4) < 0.01 for s in restored.sparsity().values())
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="different plan"):
        restored.load_state_dict({**saved["dsd"], "plan": Plan.dsd(1, 1, 1).to_dict()})


@pytest.mark.parametrize("torch_optimizer", [False, True])
def test_resume_after_a_checkpoint_mid_sparse_phase(torch_optimizer):
    """`resume(done)` takes up the phase of the last step done; with a plain torch.optim
    optimizer (whose load_state_dict drops the masks) the masks come back from the zeros."""
    torch.manual_seed(5)
    model = Net()
    plan = Plan.dsd(2, 3, 2, sparsity=0.4, unit="steps")
    dsd = DSD(model, torch.optim.Adam(model.parameters(), lr=0.01), plan)
    for step in range(4):
        dsd.step_start(step)
        _train_step(model, dsd.optimizer, step)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": dsd.optimizer.state_dict()})

    restored, restored_model = resumed(saved, Net, plan, 4, torch_optimizer=torch_optimizer)
    assert restored.phase_index == 1
    for p, q in zip(dict(dsd.named_prunable).values(), dict(restored.named_prunable).values()):
        assert torch.equal(dsd.optimizer.masks[p], restored.optimizer.masks[q])
    for step in range(4, plan.total):
        for runner, net in ((dsd, model), (restored, restored_model)):
            runner.step_start(step)
            _train_step(net, runner.optimizer, step)
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_masks_it_cannot_recover():
    model = nn.Linear(6, 4)
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), Plan.dsd(1, 2, 1, sparsity=0.5))
    with torch.no_grad():
        model.weight[0, :5] = 0  # 5 zeros, but the phase prunes 12 weights
    weights = model.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot recover the masks of sparse phase 1"):
        dsd.resume(2)
    assert dsd.phase_index is None and dsd.optimizer.masks == {}
    assert torch.equal(model.weight, weights)
    dsd.resume(1)  # after the dense phase: nothing to recover
    assert dsd.phase_index == 0
    with pytest.raises(ValueError, match="outside the plan"):
        dsd.resume(5)
