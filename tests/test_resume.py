"""A resume checks, before training anything, every file it will need later."""

import pytest

from dsd.config import RunConfig
from dsd.train import RunError, recipe, train

from _runs import interrupted_run

RUN = {"task": "digits", "phases": [1, 1, 1], "mlp_hidden": [8], "backend": "torch",
       "baseline": True}


def _files(run_dir):
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _trains_nothing(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the resume trained an epoch before refusing")

    monkeypatch.setattr(recipe, "train_epoch", no_training)


def test_a_missing_branch_checkpoint_is_refused_before_the_dsd_arm_trains(tmp_path,
                                                                           monkeypatch):
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 2), RUN)
    (run / "checkpoints" / "branch.pt").unlink()
    before = _files(run)
    _trains_nothing(monkeypatch)
    with pytest.raises(RunError, match=f"^cannot resume: {run}/checkpoints/branch.pt is missing; "
                                       "the baseline arm starts from it once the DSD arm ends"):
        train(RunConfig.from_mapping(RUN), run, quiet=True)
    assert _files(run) == before


def test_a_damaged_branch_checkpoint_is_refused_before_the_dsd_arm_trains(tmp_path,
                                                                           monkeypatch):
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 2), RUN)
    (run / "checkpoints" / "branch.pt").write_bytes(b"half a checkpoint")
    _trains_nothing(monkeypatch)
    with pytest.raises(RunError, match="^cannot resume: .*branch.pt is not a complete torch "
                                       "file"):
        train(RunConfig.from_mapping(RUN), run, quiet=True)


def test_before_the_branch_the_branch_checkpoint_is_not_needed_yet(tmp_path, monkeypatch):
    config = {**RUN, "phases": [2, 1, 1]}  # the baseline branches off after epoch 2
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 1), config)
    assert (run / "checkpoints" / "last.pt").exists()
    assert not (run / "checkpoints" / "branch.pt").exists()
    summary = train(RunConfig.from_mapping(config), run, quiet=True)
    assert set(summary["arms"]) == {"dsd", "baseline"}


def test_a_missing_dsd_model_is_refused_before_the_baseline_arm_trains(tmp_path, monkeypatch):
    run = interrupted_run(tmp_path / "run", monkeypatch, ("baseline", 2), RUN)
    (run / "model.pt").unlink()
    before = _files(run)
    _trains_nothing(monkeypatch)
    with pytest.raises(RunError, match=f"^cannot resume: {run}/model.pt \\(the DSD arm's final "
                                       "weights\\) is missing"):
        train(RunConfig.from_mapping(RUN), run, quiet=True)
    assert _files(run) == before
