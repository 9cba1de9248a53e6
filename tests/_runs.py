"""Runs in tests: reading a finished run's files, interrupting one, resuming `DSD` from a
checkpoint."""

import json

import pytest
import torch

from dsd import DSD
from dsd.config import RunConfig
from dsd.train import TIMING_KEYS, recipe, train


def metrics_rows(run_dir) -> list[dict]:
    """The rows of run_dir/metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed_rows(run_dir) -> list[dict]:
    """metrics.jsonl without the keys that time the machine: equal for equal runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS}
            for row in metrics_rows(run_dir)]


def interrupted_run(run_dir, monkeypatch, stop_at, config: dict):
    """`config` trained in run_dir and interrupted as a kill would at `stop_at` (arm name,
    epoch index), leaving the last checkpoint before that epoch."""
    train_epoch = recipe.train_epoch

    def interrupted(arm, epoch, *args, **kwargs):
        if (arm.name, epoch) == stop_at:
            raise KeyboardInterrupt
        return train_epoch(arm, epoch, *args, **kwargs)

    monkeypatch.setattr(recipe, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(RunConfig.from_mapping(config), run_dir, quiet=True)
    monkeypatch.undo()
    return run_dir


def resumed(saved: dict, build_model, plan, done: int, *, torch_optimizer: bool):
    """(DSD, model) restored from `saved` ({"model", "optimizer"} state_dicts of a DSD run with
    torch.optim.Adam, lr 0.01) into a fresh `build_model()` and resumed after `done` epochs or
    steps. `torch_optimizer`: the Adam loads the state_dict before DSD makes it masked (a plain
    torch optimizer then drops the masks, which resume must recover); else after."""
    model = build_model()
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if torch_optimizer:
        optimizer.load_state_dict(saved["optimizer"])
    restored = DSD(model, optimizer, plan)
    if not torch_optimizer:
        optimizer.load_state_dict(saved["optimizer"])
    restored.resume(done)
    return restored, model
