"""Checkpoints: a run killed at any point, even in the middle of writing a checkpoint, resumes
and ends with exactly the weights and metrics of an uninterrupted run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import _kill

from dsd.config import RunConfig
from dsd.models import build_model
from dsd.trainer import RunError, train

# Tiny and fast, but with every transition: dense -> sparse -> re-dense, plus the baseline arm
# that branches off after the first dense phase. Dropout makes the result depend on the RNG.
SETTINGS = dict(task="digits", model="mlp", phases=[2, 2, 2], sparsity=0.6, baseline=True,
                mlp_hidden=[48, 24], dropout=0.2, backend="torch", device="cpu", seed=7)

# Runs `train` and hard-kills the process in the middle of its Nth file write (tests/_kill.py).
_KILLER = textwrap.dedent("""
    import json, sys
    import _kill
    from dsd.config import RunConfig
    from dsd.trainer import train

    run_dir, kill_at, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    _kill.die_in_save(kill_at)
    train(RunConfig.from_mapping(settings), run_dir, quiet=True)
""")


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        del row["seconds"]
    return rows


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
    assert _rows(run_dir) == _rows(reference)
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
    rows = _rows(reference)
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
    rows = _rows(reference)
    summary = train(RunConfig.from_mapping(SETTINGS), reference, quiet=True)
    assert os.stat(reference / "model.pt").st_mtime_ns == mtime
    assert _rows(reference) == rows
    assert summary == json.loads((reference / "summary.json").read_text())
