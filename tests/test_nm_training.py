"""N:M structured sparsity in DSD: plans with a pattern, the tensors that take it, N:M kept
through sparse training by each optimizer path and re-established after a re-dense, resume,
and `dsd train --pattern` end to end."""

import copy
import re

import pytest
import torch
from torch import nn

from dsd import DSD, Phase, Plan
from dsd.cli import main
from dsd.config import RunConfig
from dsd.train import load_config
from dsd_kernels.semi_structured import check_nm

from _runs import interrupted_run, resumed, untimed_rows


def group_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros of every group of `m` consecutive entries along dim 1 (the reduction dim)."""
    return (weight.detach().movedim(1, -1).reshape(-1, m) != 0).sum(-1)


def assert_nm(weight: torch.Tensor, n: int, m: int) -> None:
    """At most `n` non-zeros per group: a kept weight may be exactly 0 (docs/training.md)."""
    counts = group_counts(weight, m)
    assert counts.le(n).all(), f"groups with {sorted(set(counts.tolist()))} non-zeros"


class Net(nn.Module):
    """A conv and two Linears that take 2:4 (dim 1: 4, 48, 12) and one that cannot (10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(48, 12)
        self.fc2 = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _train_step(model, optimizer, step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, 6, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# ---- plans ---------------------------------------------------------------------------------

def test_a_pattern_implies_its_sparsity_and_goes_into_the_plans_state():
    plan = Plan.dsd(2, 3, 2, pattern="2:4")
    sparse = plan.phases[1]
    assert (sparse.pattern, sparse.sparsity) == ("2:4", 0.5)
    assert plan.phases[0].pattern is None and plan.phases[2].pattern is None
    assert plan.patterns == ("2:4",)
    assert Plan.from_lengths([3], first="sparse", pattern=(1, 4)).phases[0].sparsity == 0.75
    assert Plan.dsd(1, 1, 1, pattern="2:3", sparsity=1 / 3).phases[1].pattern == "2:3"
    assert Plan.from_dict(plan.to_dict()) == plan
    assert "pattern='2:4'" in repr(plan)
    assert plan != Plan.dsd(2, 3, 2, sparsity=0.5)  # same sparsity, unstructured
    assert plan.dense_baseline().patterns == ()
    # checkpoints from before patterns existed read back as unstructured plans
    old = Plan.dsd(1, 1, 1).to_dict()
    for phase in old["phases"]:
        del phase["pattern"]
    assert Plan.from_dict(old) == Plan.dsd(1, 1, 1)


@pytest.mark.parametrize("make, message", [
    (lambda: Plan.dsd(1, 1, 1, pattern="2:4", sparsity=0.6),
     r"^sparsity 0.6 contradicts pattern 2:4, which prunes 0.5; give one or the other$"),
    (lambda: Plan.from_lengths([1], first="sparse", pattern="1:4", sparsity=0.0),
     "contradicts pattern 1:4"),
    (lambda: Phase("dense", 1, pattern="2:4"), "a dense phase has no pattern"),
    (lambda: Plan.dsd(1, 1, 1, pattern="2:4", scope="global"),
     "pattern 2:4 .* has no global ranking; use scope='layer'"),
    (lambda: Plan.dsd(1, 1, 1, pattern="4:4"), "4:4"),
    (lambda: Plan.dsd(1, 1, 1, pattern="two:four"), "two:four"),
])
def test_plan_refuses_a_bad_or_contradicted_pattern(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- DSD -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),  # fused
    lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5),   # general step
], ids=["sgd", "adamw", "rmsprop"])
def test_a_plan_ending_sparse_leaves_the_tensors_that_take_the_pattern_nm(make_optimizer):
    torch.manual_seed(0)
    model = Net()
    plan = Plan.from_lengths([1, 2, 2, 2], pattern="2:4", unit="steps")  # D S D S
    dsd = DSD(model, make_optimizer(model.parameters()), plan)
    taking = ["conv.weight", "fc1.weight", "fc2.weight"]
    assert [name for name, _ in dsd.masked_parameters(plan.phases[1])] == taking
    named = dict(model.named_parameters())
    for step in range(plan.total):
        dsd.step_start(step)
        _train_step(model, dsd.optimizer, step)
        if dsd.phase.kind == "sparse":
            assert set(dsd.optimizer.masks) == {named[name] for name in taking}
            for name in taking:  # exactly 2 kept in every group, at most 2 non-zero
                assert group_counts(dsd.optimizer.masks[named[name]], 4).eq(2).all()
                assert_nm(named[name], 2, 4)
                assert not named[name][~dsd.optimizer.masks[named[name]]].any()
            assert dsd.sparsity()["head.weight"] == 0  # cannot take 2:4: stays dense
            pruned = {name: ~dsd.optimizer.masks[named[name]] for name in taking}
        elif dsd.phase_index == 2:  # the re-dense: masks lifted, pruned weights regrow
            assert dsd.optimizer.masks == {}
            assert all(named[name][pruned[name]].any() for name in taking)
    for name in taking:
        assert_nm(named[name], 2, 4)


def test_the_tensors_a_pattern_cannot_fit_are_refused_when_named_or_when_all_selected():
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^include names head.weight \(shape \(3, 10\)\), which "
                                         r"cannot take pattern 2:4: dim 1 \(10\) is not a "
                                         r"multiple of 4$"):
        DSD(model, optimizer, Plan.dsd(1, 1, 1, pattern="2:4",
                                       include=["fc1.weight", "head.weight"]))
    with pytest.raises(ValueError, match=r"^no selected parameter can take pattern 2:4 .*: "
                                         r"head.weight \(3, 10\), head.bias \(3,\)$"):
        DSD(model, optimizer, Plan.dsd(1, 1, 1, pattern="2:4", include="head.*"))
    assert not hasattr(optimizer, "masks")  # refused before the optimizer changed
    # A wildcard that also selects tensors that cannot take it: they stay dense.
    dsd = DSD(model, optimizer, Plan.dsd(1, 1, 1, pattern="2:4", include="*.weight"))
    assert [n for n, _ in dsd.masked_parameters(dsd.plan.phases[1])] == \
        ["conv.weight", "fc1.weight", "fc2.weight"]


@pytest.mark.parametrize("torch_optimizer", [False, True])
def test_resume_mid_sparse_phase_keeps_the_nm_masks(torch_optimizer):
    """With a plain torch.optim optimizer (which drops the masks) they come back from the
    weights' zeros, which are those of the pattern."""
    torch.manual_seed(1)
    model = Net()
    plan = Plan.dsd(1, 3, 1, pattern="1:4", unit="steps")
    dsd = DSD(model, torch.optim.Adam(model.parameters(), lr=0.01), plan)
    for step in range(3):
        dsd.step_start(step)
        _train_step(model, dsd.optimizer, step)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": dsd.optimizer.state_dict(),
                           "dsd": dsd.state_dict()})
    restored, _ = resumed(saved, Net, plan, 3, torch_optimizer=torch_optimizer)
    pairs = zip(dsd.masked_parameters(plan.phases[1]), restored.masked_parameters(plan.phases[1]))
    for (_, p), (_, q) in pairs:
        assert torch.equal(dsd.optimizer.masks[p], restored.optimizer.masks[q])
    with pytest.raises(ValueError, match="different plan"):
        restored.load_state_dict({**saved["dsd"], "plan": Plan.dsd(1, 3, 1, sparsity=0.75,
                                                                   unit="steps").to_dict()})


def test_resume_recovers_masks_that_keep_zeros():
    """A group with fewer than N non-zeros (here an embedding's padding row, all zeros) keeps
    zeros; recovered from the weights, the masks are those the sparse phase set."""
    torch.manual_seed(2)
    model = nn.Embedding(6, 8, padding_idx=0)
    plan = Plan.dsd(1, 2, 1, pattern="2:4")
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), plan)
    dsd.epoch_start(1)
    masks = dict(dsd.optimizer.masks)
    assert group_counts(masks[model.weight][:1], 4).tolist() == [2, 2]  # zeros kept
    restored = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), plan)
    restored.resume(2)
    assert torch.equal(restored.optimizer.masks[model.weight], masks[model.weight])


def test_resume_refuses_zeros_that_are_not_the_pattern():
    model = nn.Linear(8, 2)
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1),
              Plan.dsd(1, 2, 1, pattern="2:4"))
    with torch.no_grad():
        model.weight[:, :4] = 0  # half the weights are zero, but whole groups
    with pytest.raises(ValueError, match="zeros of weight are not those of pattern 2:4"):
        dsd.resume(2)


# ---- dsd train -------------------------------------------------------------------------------

RUN = ["--task", "digits", "--mlp-hidden", "8", "--backend", "torch", "--quiet",
       "--first-phase", "sparse", "--phases", "2", "--pattern", "2:4"]


def test_dsd_train_pattern_sparse_only_end_to_end_and_resumed(tmp_path, monkeypatch, capsys):
    """An S-only plan (--first-phase sparse, one phase) with --pattern 2:4: the final model is
    2:4 in every prunable tensor; a run interrupted mid-phase resumes with its pattern and
    ends as the uninterrupted one."""
    straight = tmp_path / "straight"
    assert main(["train", *RUN, "--out", str(straight)]) == 0
    assert "pattern 2:4 (sparsity 50%)" in capsys.readouterr().out
    weights = torch.load(straight / "model.pt")
    for name in ("hidden.0.weight", "out.weight"):  # dim 1: 64 and 8
        assert_nm(weights[name], 2, 4)
    exported = {name: weights[name] for name in ("hidden.0.weight", "out.weight")}
    assert check_nm(exported, "2:4") == list(exported)  # what export checks before converting
    config = load_config(straight)
    assert (config.pattern, config.sparsity) == ("2:4", 0.5)

    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 1), config.to_dict())
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    resumed = torch.load(run / "model.pt")
    for key, value in weights.items():
        assert torch.equal(resumed[key], value), key
    assert untimed_rows(run) == untimed_rows(straight)


@pytest.mark.parametrize("flags, message", [
    (["--pattern", "4:4"], r"--pattern must be 'N:M' .* got '4:4'$"),
    (["--pattern", "1:4", "--sparsity", "0.5"], None),  # the default counts as not given
    (["--pattern", "2:4", "--sparsity", "0.3"],
     "--sparsity 0.3 contradicts pattern 2:4, which prunes 0.5; leave sparsity out"),
    (["--pattern", "2:4", "--scope", "global"],
     "--scope global does not apply to pattern 2:4"),
    (["--pattern", "2:4", "--include", "out.weight", "--mlp-hidden", "6"],
     r"include names out.weight \(shape \(10, 6\)\), which cannot take pattern 2:4"),
    (["--pattern", "2:4", "--include", "out.*", "--mlp-hidden", "6"],
     "no selected parameter can take pattern 2:4"),
])
def test_dsd_train_pattern_errors_are_one_line(capsys, flags, message):
    code = main(["train", "--task", "digits", "--backend", "torch", "--dry-run", *flags])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("dsd: error: ")
    assert re.search(message, err), err


def test_config_records_the_canonical_pattern_and_its_sparsity():
    config = RunConfig.from_mapping({"pattern": "1:8"})
    assert (config.pattern, config.sparsity) == ("1:8", 0.875)
    assert RunConfig.from_mapping(config.to_dict()) == config
    assert RunConfig().pattern == "" and RunConfig().plan().patterns == ()
