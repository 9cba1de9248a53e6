"""`--init` with the files a `dsd train` run leaves: model.pt, and its checkpoints, which say
which weights they hold (the DSD arm's are taken; the baseline arm's are refused)."""

import shutil

import pytest
import torch

from dsd.config import RunConfig
from dsd.train import RunError, dry_run, train
from dsd.train.init_file import read_init

from _runs import interrupted_run

RUN = {"task": "digits", "phases": [1, 1, 1], "mlp_hidden": [8], "backend": "torch",
       "baseline": True}


def _run(run_dir):
    train(RunConfig.from_mapping(RUN), run_dir, quiet=True)
    return run_dir


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("finished") / "run")


def test_a_finished_runs_last_pt_gives_its_final_dsd_weights(finished):
    init = read_init(str(finished / "checkpoints" / "last.pt"))
    assert _equal(init.state, torch.load(finished / "model.pt"))
    assert init.holds == f"the final DSD weights of the finished run {finished} (its model.pt)"
    config = RunConfig.from_mapping({**RUN, "init": str(finished / "checkpoints" / "last.pt")})
    assert "the final DSD weights of the finished run" in dry_run(config)


def test_a_finished_runs_last_pt_without_its_run_directory_is_refused(finished, tmp_path):
    alone = tmp_path / "last.pt"
    shutil.copy(finished / "checkpoints" / "last.pt", alone)
    with pytest.raises(RunError, match=r"is the checkpoint of a finished run, which keeps no "
                                       r"weights: pass the run directory's model\.pt"):
        read_init(str(alone))


def test_the_branch_checkpoint_gives_the_weights_after_the_first_dense_phase(finished):
    init = read_init(str(finished / "checkpoints" / "branch.pt"))
    assert init.holds == "the DSD arm's weights after epoch 1 of 3 (dense phase 1)"


def test_a_checkpoint_in_the_dsd_arm_gives_its_weights_and_phase(tmp_path, monkeypatch):
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 2), RUN)
    last = run / "checkpoints" / "last.pt"
    init = read_init(str(last))
    assert _equal(init.state, torch.load(last, weights_only=True)["model"])
    assert init.holds == ("the DSD arm's weights after epoch 2 of 3 (sparse phase 2: 50% of its "
                          "prunable weights zero)")


def test_a_checkpoint_in_the_baseline_arm_is_refused_saying_what_to_pass(tmp_path,
                                                                         monkeypatch):
    run = interrupted_run(tmp_path / "run", monkeypatch, ("baseline", 2), RUN)
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(RunError) as refused:
        read_init(str(last))
    message = str(refused.value)
    assert message == (
        f"init file {last} holds the dense baseline arm's weights after epoch 2 of 3, not the "
        f"DSD arm's (the run stopped in its baseline arm): pass {run}/model.pt for the final "
        f"DSD weights, or finish the run with `dsd train --resume {run}` and pass "
        "baseline_model.pt for the baseline's")
    config = RunConfig.from_mapping({**RUN, "init": str(last)})
    with pytest.raises(RunError, match="dense baseline arm's weights"):
        dry_run(config)


def test_a_checkpoint_of_another_format_is_refused(finished, tmp_path):
    state = torch.load(finished / "checkpoints" / "branch.pt", weights_only=True)
    state["format"] = 1
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(RunError, match="is a dsd checkpoint of format 1; this dsd reads format "
                                       "2: pass the run's model.pt"):
        read_init(str(tmp_path / "old.pt"))
