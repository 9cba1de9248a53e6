"""Checkpoints: a run killed at any point, even in the middle of writing a checkpoint, resumes
and ends with exactly the weights and metrics of an uninterrupted run."""

import errno
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from dsd.cli import main
from dsd.config import RunConfig
from dsd.models import build_model
from dsd.train import RunError, train

import _kill
from _runs import untimed_rows

# Tiny and fast, but with every transition: dense -> sparse -> re-dense, plus the baseline arm
# that branches off after the first dense phase. Dropout makes the result depend on the RNG.
SETTINGS = dict(task="digits", model="mlp", phases=[2, 2, 2], sparsity=0.6, baseline=True,
                mlp_hidden=[48, 24], dropout=0.2, backend="torch", device="cpu", seed=7)

# Runs `train` and hard-kills the process in the middle of its Nth file write (tests/_kill.py).
_KILLER = textwrap.dedent("""
    import json, sys
    import _kill
    from dsd.config import RunConfig
    from dsd.train import train

    run_dir, kill_at, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    _kill.die_in_save(kill_at)
    train(RunConfig.from_mapping(settings), run_dir, quiet=True)
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(RunConfig.from_mapping(SETTINGS), run_dir, quiet=True)
    return run_dir


def _assert_same_run(run_dir, reference):
    for name in ("model.pt", "baseline_model.pt"):
        resumed, uninterrupted = torch.load(run_dir / name), torch.load(reference / name)
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            assert torch.equal(resumed[key], uninterrupted[key]), (name, key)
    assert untimed_rows(run_dir) == untimed_rows(reference)
    assert json.loads((run_dir / "sparsity.json").read_text()) == \
        json.loads((reference / "sparsity.json").read_text())


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way may swallow it."""


# torch.save calls in order: epoch 1 last.pt (1), branch.pt (2), epoch 2 last.pt (3), epochs 3-6
# (4-7), model.pt (8), the switch to the baseline (9), baseline epochs 3-6 (10-13),
# baseline_model.pt (14), the final state (15). Points: the branch, mid-sparse, the DSD model,
# the switch to the baseline, the baseline model.
@pytest.mark.parametrize("kill_at", [2, 5, 8, 9, 14])
def test_interrupted_mid_save_resumes_to_identical_weights(reference, tmp_path, monkeypatch,
                                                           kill_at):
    run_dir = tmp_path / "run"
    real_save, calls = torch.save, [0]

    def interrupted_save(obj, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            file.write(b"half a checkpoint")
            raise _Killed
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(_Killed):
        train(RunConfig.from_mapping(SETTINGS), run_dir, quiet=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (run_dir / "summary.json").exists()
    train(RunConfig.from_mapping(SETTINGS), run_dir, quiet=True)
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_hard_kill_mid_save_leaves_a_torn_temp_and_resumes(reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(run_dir), "5",
                             json.dumps(SETTINGS)], capture_output=True, text=True,
                            env=_kill.subprocess_env())
    assert killed.returncode == 9, killed.stderr
    torn = list(run_dir.rglob(".*.tmp"))
    assert torn, "the kill should have left a half-written temp file"
    train(RunConfig.from_mapping(SETTINGS), run_dir, quiet=True)
    assert not any(path.exists() for path in torn)
    _assert_same_run(run_dir, reference)


def test_arms_are_paired_and_differ_only_after_the_branch(reference):
    rows = untimed_rows(reference)
    dsd = [r for r in rows if r["arm"] == "dsd"]
    baseline = [r for r in rows if r["arm"] == "baseline"]
    assert [r["epoch"] for r in dsd] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in baseline] == [3, 4, 5, 6]  # it shares epochs 1-2 with DSD
    assert [r["lr"] for r in baseline] == [r["lr"] for r in dsd[2:]]  # the same LR drop
    assert all(abs(r["sparsity"] - 0.6) < 1e-3 for r in dsd[2:4])  # floor(0.6 N) per layer
    assert all(r["sparsity"] < 0.05 for r in baseline)


def test_final_model_is_a_plain_state_dict_of_the_model_class(reference):
    state = torch.load(reference / "model.pt", weights_only=True)
    model = build_model("mlp", (8, 8), 10, mlp_hidden=[48, 24])
    assert list(state) == list(model.state_dict())
    model.load_state_dict(state)  # strict: no extra or missing keys


def test_checkpoint_from_another_config_is_refused(reference, tmp_path):
    other = dict(SETTINGS, sparsity=0.3)
    run_dir = tmp_path / "run"
    train(RunConfig.from_mapping(dict(other, phases=[1, 1, 1])), run_dir, quiet=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(
        (reference / "checkpoints" / "last.pt").read_bytes())
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(RunError, match="another config"):
        train(RunConfig.from_mapping(dict(other, phases=[1, 1, 1])), run_dir, quiet=True)
    with pytest.raises(RunError, match=r"another config \(phases: \[1, 1, 1\] there"):
        train(RunConfig.from_mapping(other), run_dir, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_finished_run_reports_without_training_again(reference):
    mtime = os.stat(reference / "model.pt").st_mtime_ns
    rows = untimed_rows(reference)
    summary = train(RunConfig.from_mapping(SETTINGS), reference, quiet=True)
    assert os.stat(reference / "model.pt").st_mtime_ns == mtime
    assert untimed_rows(reference) == rows
    assert summary == json.loads((reference / "summary.json").read_text())


@pytest.fixture
def interrupted(reference, tmp_path):
    """A run stopped after epoch 2: its config, metrics and checkpoints, no outputs yet."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("config.toml", "metrics.jsonl", "checkpoints/branch.pt"):
        (run_dir / name).write_bytes((reference / name).read_bytes())
    (run_dir / "checkpoints" / "last.pt").write_bytes((reference / "checkpoints/branch.pt")
                                                      .read_bytes())
    return run_dir


def _with_nan(entry):
    def corrupt(path):
        state = torch.load(path, weights_only=True)
        part, key = entry
        tensor = state[part][key] if part == "model" else state[part]["state"][0][key]
        tensor.view(-1)[0] = float("nan")
        torch.save(state, path)
    return corrupt


def _snapshot(run_dir):
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in run_dir.rglob("*")}


@pytest.mark.parametrize("corrupt, fault", [
    (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
     "is not a complete torch file (truncated or corrupted)"),
    (lambda path: path.write_bytes(b""), "is empty"),
    (lambda path: path.write_bytes(random.Random(0).randbytes(4096)),
     "is not a complete torch file (truncated or corrupted)"),
    (lambda path: torch.save({"hello": 1}, path), "is not a dsd checkpoint"),
    (_with_nan(("model", "hidden.0.weight")), "holds NaN or Inf in model entry 'hidden.0.weight'"),
    (_with_nan(("optimizer", "exp_avg")), "holds NaN or Inf in optimizer entry 'state.0.exp_avg'"),
], ids=["truncated", "empty", "random-bytes", "foreign", "nan-weight", "nan-optimizer-state"])
def test_a_bad_checkpoint_is_a_one_line_error_and_the_run_is_left_as_it_was(interrupted,
                                                                            corrupt, fault):
    last = interrupted / "checkpoints" / "last.pt"
    corrupt(last)
    before = _snapshot(interrupted)
    with pytest.raises(RunError) as error:
        train(RunConfig.from_mapping(SETTINGS), interrupted, quiet=True)
    assert str(error.value) == f"cannot resume: {last} {fault}"
    assert _snapshot(interrupted) == before


class _FullDisk:
    """A file with room for `room` more bytes, then failing as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)


def test_a_full_disk_mid_save_is_one_line_keeps_the_checkpoint_and_resumes(reference, tmp_path,
                                                                           monkeypatch, capsys):
    config_file = tmp_path / "dsd.toml"
    config_file.write_text(RunConfig.from_mapping(SETTINGS).to_toml())
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    real_save, calls, previous = torch.save, [0], []

    def save_on_a_full_disk(obj, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # epoch 4's last.pt (see the kill points above)
            previous.append(last.read_bytes())
            file = _FullDisk(file, room=4096)
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    assert main(["train", "--config", str(config_file), "--out", str(run_dir), "--quiet"]) == 1
    assert capsys.readouterr().err == (
        f"dsd: error: cannot write {last}: No space left on device; nothing saved before it is "
        f"lost: resume with `dsd train --resume {run_dir}`\n")
    assert last.read_bytes() == previous[0]
    assert not list(run_dir.rglob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    _assert_same_run(run_dir, reference)


def test_a_diverging_run_stops_at_its_first_non_finite_epoch(tmp_path):
    # A re-dense LR of 0.05 x 1e7 makes SGD overflow in epoch 5, the first of re-dense.
    settings = dict(SETTINGS, optimizer="sgd", lr=0.05, redense_lr_factor=1e7, baseline=False)
    run_dir = tmp_path / "run"
    with pytest.raises(RunError) as error:
        train(RunConfig.from_mapping(settings), run_dir, quiet=True)
    assert re.fullmatch(r"training diverged in epoch 5 of the dsd arm \(dense phase, lr 500000\): "
                        r"train loss (nan|inf); stopped before saving it, so the run's files hold "
                        r"only the epochs before it \(try a lower lr in a new run\)",
                        str(error.value))
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 4
    assert all(tensor.isfinite().all() for tensor in state["model"].values())
    assert [row["epoch"] for row in untimed_rows(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / "model.pt").exists()
