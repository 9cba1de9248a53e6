"""The `dsd` command end to end on a tiny budget, config files, and every kind of bad input."""

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import dsd_kernels as dk
from dsd.cli import main, parse_settings
from dsd.config import RunConfig
from dsd.models import build_model
from dsd_kernels import backends

TINY = ["--task", "digits", "--phases", "2,1,2", "--mlp-hidden", "32,16", "--backend", "torch"]


def test_train_with_baseline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--baseline", "--sparsity", "0.75", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "DSD test acc" in printed and "dense test acc" in printed
    assert "2 sparse 75%" in printed and "3 re-dense" in printed

    config = RunConfig.from_toml(out / "config.toml")
    assert config.phases == [2, 1, 2] and config.sparsity == 0.75 and config.baseline
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["epoch"], r["kind"]) for r in rows] == [
        ("dsd", 1, "dense"), ("dsd", 2, "dense"), ("dsd", 3, "sparse"), ("dsd", 4, "dense"),
        ("dsd", 5, "dense"), ("baseline", 3, "dense"), ("baseline", 4, "dense"),
        ("baseline", 5, "dense")]
    sparsity = json.loads((out / "sparsity.json").read_text())
    sparse_phase = sparsity["dsd"][1]
    assert sparse_phase["kind"] == "sparse" and sparse_phase["first_epoch"] == 3
    for layer in ("hidden.0.weight", "hidden.1.weight", "out.weight"):
        assert sparse_phase["start"][layer] == pytest.approx(0.75, abs=1e-3)
        assert sparse_phase["end"][layer] == pytest.approx(0.75, abs=1e-3)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"dsd", "baseline"}
    assert (out / "summary.txt").read_text() in printed
    model = build_model("mlp", (8, 8), 10, mlp_hidden=[32, 16])
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))


def test_config_file_then_flags(tmp_path):
    config_file = tmp_path / "dsd.toml"
    config_file.write_text('task = "digits"\nmodel = "cnn"\nphases = [1, 1, 1]\n'
                           'cnn_channels = [4, 4]\nbackend = "torch"\nseed = 1\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--seed", "3", "--out", str(out),
                 "--quiet"]) == 0
    config = RunConfig.from_toml(out / "config.toml")
    assert (config.model, config.cnn_channels, config.seed) == ("cnn", [4, 4], 3)


def test_resume_flag_continues_with_the_saved_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--quiet"]) == 0
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert "DSD test acc" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--seed", "2"]) == 2
    assert "--resume takes the run's own config" in capsys.readouterr().err


@pytest.mark.parametrize("args, config_text, message", [
    (["--sparsity", "1.0"], None, r"--sparsity must be a number in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], None, r"--sparsity must be a number in [0, 1), got -0.1"),
    (["--sparsity", "nan"], None, r"--sparsity must be a number in [0, 1), got nan"),
    (["--lr", "inf"], None, "--lr must be a number > 0, got inf"),
    (["--lr", "-1e-3"], None, "--lr must be a number > 0, got -0.001"),
    (["--phases", "3,0,3"], None, "--phases: every phase needs at least 1 epoch, got 0"),
    (["--phases", "-1,1,1"], None, "--phases: every phase needs at least 1 epoch, got -1"),
    (["--phases", ""], None, "--phases is empty"),
    (["--exclude", "hidden.9.*"], None, "'hidden.9.*' matches no parameter"),
    (["--model", "resnet"], None, "--model: unknown model 'resnet'; choose one of auto, mlp"),
    (["--model-args", '{"depth": 3}'], None, "--model-args are for a MODULE:FACTORY model"),
    (["--optimizer", "adamm"], None, "--optimizer: unknown optimizer 'adamm'; choose one of "
     "adadelta, "),
    (["--optimizer", "dsd_absent_optim:Opt"], None, "--optimizer 'dsd_absent_optim:Opt': cannot "
     "import 'dsd_absent_optim': ModuleNotFoundError"),
    (["--optimizer", "torch.nn:Linear"], None, "--optimizer 'torch.nn:Linear': class Linear is "
     "not a torch.optim.Optimizer subclass"),
    (["--optimizer", "rmsprop", "--optimizer-args", '{"momentum": -1}'], None,
     "--optimizer-args: RMSprop(lr=0.002, weight_decay=0.0, momentum=-1) failed: ValueError: "
     "Invalid momentum value: -1"),
    (["--optimizer", "nadam", "--optimizer-args", '{"nesterov": true}'], None,
     "--optimizer-args: NAdam(lr=0.002, weight_decay=0.0, nesterov=True) failed: TypeError: "),
    (["--optimizer", "adam", "--optimizer-args", '{"lr": 1}'], None,
     "--optimizer-args: 'lr' is a run option of its own; set lr (--lr) instead"),
    (["--optimizer", "rprop", "--weight-decay", "0.1"], None,
     "--weight-decay must be 0: torch.optim.Rprop takes no weight_decay"),
    (["--optimizer", "SparseAdam"], None, "--optimizer sparseadam: "),
    ([], 'optimizer = "adamm"\n', "bad.toml: optimizer: unknown optimizer 'adamm'"),
    ([], 'task = "imagenet"\n', "unknown task 'imagenet'; choose one of mnist1d, digits"),
    ([], 'model = "resnet"\n', "unknown model 'resnet'"),
    ([], "sparsty = 0.5\n", "unknown key 'sparsty'; did you mean 'sparsity'?"),
    ([], 'sparsity = "0.5"\n', "bad.toml: sparsity must be float, got '0.5'"),
    ([], "sparsity = nan\n", "bad.toml: sparsity must be a number in [0, 1), got nan"),
    ([], "phases = [4, 4\n", "is not valid TOML"),
])
def test_bad_input_is_a_clear_error_and_leaves_no_run_dir(tmp_path, capsys, args, config_text,
                                                          message):
    out = tmp_path / "run"
    if config_text is not None:
        (tmp_path / "bad.toml").write_text(config_text)
        args = args + ["--config", str(tmp_path / "bad.toml")]
    assert main(["train", *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("dsd: error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == ([tmp_path / "bad.toml"] if config_text else [])


@pytest.mark.filterwarnings("error")  # numpy's empty-slice warnings among them
def test_a_val_fraction_leaving_no_training_example_is_one_line_and_leaves_no_run_dir(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run directory (runs/...) would go
    assert main(["train", "--task", "mnist1d", "--mnist1d-samples", "200", "--val-fraction",
                 "0.9999", "--phases", "1,1,1", "--backend", "torch"]) == 2
    assert capsys.readouterr().err == (
        "dsd: error: val_fraction 0.9999 splits the 160 training examples of task mnist1d into "
        "0 for training and 160 for validation; each needs at least 1: give a smaller "
        "--val-fraction\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value", [("--task", "imagenet"), ("--lr", "fast"),
                                         ("--model-args", "{depth: 3}"),
                                         ("--model-args", "[3]"),
                                         ("--optimizer-args", '{"momentum": 0.5')])
def test_bad_flags_are_rejected_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", flag, value, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and ("invalid" in err or "expected a JSON object" in err)
    assert not (tmp_path / "run").exists()


def test_an_out_path_through_a_file_names_the_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out in ("afile/sub", "afile"):
        assert main(["train", *TINY, "--out", str(tmp_path / out)]) == 2
        assert capsys.readouterr().err == \
            f"dsd: error: --out {tmp_path / out}: {tmp_path / 'afile'} is a file, not a directory\n"
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_an_out_that_cannot_be_created_names_it_not_a_staging_dir(tmp_path, capsys, monkeypatch):
    def refused(path, *args, **kwargs):  # as a read-only parent does, even for root
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(Path, "mkdir", refused)
    out = tmp_path / "ro" / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert capsys.readouterr().err == \
        f"dsd: error: --out {out}: cannot create it: Permission denied\n"
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_of_another_config_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--quiet"]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["train", *TINY, "--sparsity", "0.3", "--out", str(out)]) == 2
    assert "holds a run with another config (sparsity: 0.5 there, 0.3 here)" in \
        capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_info_names_device_and_backends(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "device: " in printed
    assert "dsd_kernels backends available: " in printed and "torch" in printed
    assert "cpu -> " in printed


def test_dsd_backend_is_the_default_and_the_run_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_BACKEND", "torch")
    tiny = [arg for arg in TINY if arg not in ("--backend", "torch")]
    out = tmp_path / "run"
    try:
        assert main(["train", *tiny, "--phases", "1,1,1", "--out", str(out), "--quiet"]) == 0
        assert dk.selected_backends()["cpu"] == "torch"
        assert RunConfig.from_toml(out / "config.toml").backend == "torch"
        monkeypatch.delenv("DSD_BACKEND")  # --resume takes the recorded backend
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
        monkeypatch.setenv("DSD_BACKEND", "torch")  # a flag or config key wins over it
        assert main(["train", *tiny, "--phases", "1,1,1", "--backend", "auto",
                     "--out", str(tmp_path / "auto"), "--quiet"]) == 0
        assert RunConfig.from_toml(tmp_path / "auto" / "config.toml").backend == "auto"
    finally:
        dk.use_backend("auto")


def test_info_reports_an_unavailable_backend_as_a_line(monkeypatch, capsys):
    monkeypatch.setitem(backends._loaded, "triton", backends.BackendUnavailable("no CUDA device"))
    monkeypatch.setattr(backends, "_plan", None)
    monkeypatch.setenv("DSD_BACKEND", "triton")
    try:
        assert main(["info"]) == 0
    finally:
        dk.use_backend("auto")
    assert "selected (DSD_BACKEND=triton): none, ops would fail: backend 'triton' is not " \
        "available: no CUDA device\n" in capsys.readouterr().out




def test_study_settings_are_toml_values():
    assert parse_settings(['device="cuda"', "phases = [1, 2, 3]", "sparsity=0.3"]) == {
        "device": "cuda", "phases": [1, 2, 3], "sparsity": 0.3}
    with pytest.raises(ValueError, match="^--set takes KEY=VALUE, got 'sparsity'$"):
        parse_settings(["sparsity"])
    with pytest.raises(ValueError, match=r"^--set 'device=cuda': not a TOML value \("):
        parse_settings(["device=cuda"])


def test_an_optimizer_of_the_users_module_that_cannot_be_masked_is_one_line(tmp_path, capsys,
                                                                            monkeypatch):
    """MODULE:CLASS imports from the current directory; a class whose state at a weight that
    only ever saw 0 is random has no fresh state to reset pruned positions to."""
    (tmp_path / "dsd_test_noisy_optim.py").write_text(
        "import torch\n\n"
        "class Noisy(torch.optim.SGD):\n"
        "    def step(self, closure=None):\n"
        "        for group in self.param_groups:\n"
        "            for p in group['params']:\n"
        "                self.state[p]['noise'] = torch.randn_like(p)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "dsd_test_noisy_optim", raising=False)
    assert main(["train", *TINY, "--optimizer", "dsd_test_noisy_optim:Noisy", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsd: error: --optimizer dsd_test_noisy_optim:Noisy: cannot mask "
                          "dsd_test_noisy_optim.Noisy: its state 'noise'") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    sys.modules.pop("dsd_test_noisy_optim", None)
