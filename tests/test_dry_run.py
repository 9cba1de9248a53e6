"""`dsd train --dry-run`: what the plan prunes of each parameter, and why not."""

import sys
import textwrap

import pytest

from dsd.config import RunConfig
from dsd.train import dry_run


@pytest.fixture
def frozen_factory(tmp_path, monkeypatch):
    """A factory model for task digits whose first layer is frozen."""
    (tmp_path / "frozen_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def build():
            model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
            model[1].requires_grad_(False)
            return model
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "frozen_nets", raising=False)
    yield "frozen_nets:build"
    sys.modules.pop("frozen_nets", None)


def test_frozen_parameters_are_listed_as_not_pruned_saying_why(frozen_factory):
    text = dry_run(RunConfig.from_mapping({"task": "digits", "model": frozen_factory,
                                           "backend": "torch", "sparsity": 0.5}))
    rows = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert rows["1.weight"].endswith("- (frozen)")
    assert rows["1.bias"].endswith("- (frozen)")
    assert rows["3.weight"].endswith(f"{16 * 10 // 2:,}")
    assert rows["3.bias"].split()[-1] == "-"
    assert f"model {frozen_factory}: 1,210 parameters, 1 tensors prunable holding 160" in text


@pytest.mark.parametrize("optimizer, args, shown", [
    ("sgd", {}, "optimizer sgd: torch.optim.SGD(lr=0.002, momentum=0.9, weight_decay=0.0), "
                "fused masked step"),
    ("RMSprop", {"centered": True}, "optimizer rmsprop: torch.optim.RMSprop(lr=0.002, "
                                    "weight_decay=0.0, centered=True), general masked step"),
    ("lion_pytorch:Lion", {"betas": [0.9, 0.99]}, "optimizer lion_pytorch:Lion: "
     "lion_pytorch.lion_pytorch.Lion(lr=0.002, weight_decay=0.0, betas=[0.9, 0.99]), general "
     "masked step")])
def test_the_optimizer_is_shown_with_its_arguments_and_masked_step(optimizer, args, shown):
    text = dry_run(RunConfig.from_mapping({"task": "digits", "backend": "torch",
                                           "optimizer": optimizer, "optimizer_args": args}))
    assert shown in text.splitlines()


def test_a_pattern_lists_the_tensors_that_take_it_and_those_that_stay_dense():
    text = dry_run(RunConfig.from_mapping({"task": "digits", "mlp_hidden": [6],
                                           "backend": "torch", "pattern": "2:4"}))
    rows = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert rows["hidden.0.weight"].endswith(f"{6 * 64 // 2:,} (2:4)")
    assert rows["out.weight"].endswith("0 (stays dense: dim 1 (6) is not a multiple of 4)")
    assert rows["out.bias"].split()[-1] == "-"
    assert ("1 tensors take pattern 2:4, 1 other prunable stay dense, holding 384 weights"
            in text)
    assert "pattern 2:4 (sparsity 0.5)" in text
