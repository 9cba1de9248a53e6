"""A resume checks, before training anything, every file it will need later, and rebuilds
the run's own optimizer."""

import pytest
import torch

from dsd.cli import main
from dsd.config import RunConfig
from dsd.train import RunError, load_config, recipe, train

from _runs import interrupted_run, untimed_rows

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


def test_a_run_of_another_optimizer_resumes_bit_exactly_from_its_saved_config(tmp_path,
                                                                             monkeypatch):
    """The optimizer's name (any case) and arguments go into config.toml; `--resume` rebuilds
    the same masked optimizer, and the run ends as an uninterrupted one does."""
    args = ["--task", "digits", "--phases", "1,2,1", "--mlp-hidden", "8", "--backend", "torch",
            "--optimizer", "RMSprop", "--optimizer-args", '{"momentum": 0.5, "centered": true}',
            "--lr", "0.01", "--quiet"]
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    config = load_config(tmp_path / "straight")
    assert (config.optimizer, config.optimizer_args) == ("rmsprop",
                                                         {"momentum": 0.5, "centered": True})
    # Stopped in the middle of the sparse phase: the masks come back with the optimizer.
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 2), config.to_dict())
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    resumed, straight = torch.load(run / "model.pt"), torch.load(tmp_path / "straight" /
                                                                "model.pt")
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    assert untimed_rows(run) == untimed_rows(tmp_path / "straight")


def test_a_run_from_before_the_pattern_and_masks_options_resumes(tmp_path, monkeypatch):
    """Its config.toml and checkpoints have no pattern or masks key: they read as unstructured
    magnitude pruning."""
    config = {"task": "digits", "phases": [1, 1], "mlp_hidden": [8], "backend": "torch"}
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 1), config)
    toml = run / "config.toml"
    toml.write_text("".join(line for line in toml.read_text().splitlines(keepends=True)
                            if not line.startswith(("pattern ", "masks "))))
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    del state["config"]["pattern"], state["config"]["masks"]
    torch.save(state, last)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (load_config(run).pattern, load_config(run).masks) == ("", "magnitude")


def test_a_checkpoint_with_a_pruned_weight_not_zero_is_refused(tmp_path, monkeypatch):
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 2), RUN)  # in the sparse phase
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last)
    index = list(state["model"]).index("hidden.0.weight")  # no buffers: the parameters' order
    pruned = (~state["optimizer"]["masks"][index]).nonzero()[0].tolist()
    state["model"]["hidden.0.weight"][tuple(pruned)] = 0.5
    torch.save(state, last)
    before = _files(run)
    _trains_nothing(monkeypatch)
    with pytest.raises(RunError, match=f"^cannot resume: {last} holds non-zero weights that the "
                                       "mask of hidden.0.weight prunes: its weights or its masks "
                                       "were changed after it was saved$"):
        train(RunConfig.from_mapping(RUN), run, quiet=True)
    assert _files(run) == before
