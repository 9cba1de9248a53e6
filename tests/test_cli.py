"""The `dsd` command end to end on a tiny budget, config files, and every kind of bad input."""

import json
import pytest
import torch

from dsd.cli import main
from dsd.config import RunConfig
from dsd.models import build_model

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
    (["--sparsity", "1.0"], None, r"sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], None, r"sparsity must be in [0, 1), got -0.1"),
    (["--phases", "3,0,3"], None, "every phase needs at least 1 epoch"),
    (["--phases", ""], None, "phases is empty"),
    (["--exclude", "hidden.9.*"], None, "'hidden.9.*' matches no parameter"),
    ([], 'task = "imagenet"\n', "unknown task 'imagenet'; choose one of mnist1d, digits"),
    ([], 'model = "resnet"\n', "unknown model 'resnet'"),
    ([], "sparsty = 0.5\n", "unknown key 'sparsty'; did you mean 'sparsity'?"),
    ([], 'sparsity = "0.5"\n', "sparsity must be float, got '0.5'"),
    ([], "phases = [4, 4\n", "is not valid TOML"),
])
def test_bad_input_is_a_clear_error_and_leaves_no_run_dir(tmp_path, capsys, args, config_text,
                                                          message):
    out = tmp_path / "run"
    if config_text is not None:
        (tmp_path / "bad.toml").write_text(config_text)
        args = args + ["--config", str(tmp_path / "bad.toml")]
    assert main(["train", *TINY, *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == ([tmp_path / "bad.toml"] if config_text else [])


@pytest.mark.parametrize("flag, value", [("--task", "imagenet"), ("--model", "resnet"),
                                         ("--lr", "fast")])
def test_bad_flags_are_rejected_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", flag, value, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "invalid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


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


def test_paired_test_matches_a_hand_computed_example():
    from dsd.study import paired_test

    result = paired_test([0.81, 0.72, 0.93], [0.80, 0.70, 0.90])  # differences 1, 2, 3 points
    assert result["mean_diff"] == pytest.approx(0.02)
    assert result["sd_diff"] == pytest.approx(0.01)
    # t = 0.02 / (0.01 / sqrt 3) = 3.4641 on 2 degrees of freedom; t_0.975 = 4.3027
    assert result["p_value"] == pytest.approx(0.07418, abs=1e-4)
    assert result["ci95"] == pytest.approx([0.02 - 0.024841, 0.02 + 0.024841], abs=1e-5)
    assert result["outside_noise"] is False
    # +1 of 450 test examples on every seed: equal differences, up to float rounding
    constant = paired_test([442 / 450, 439 / 450, 440 / 450], [441 / 450, 438 / 450, 439 / 450])
    assert constant["p_value"] is None and constant["outside_noise"] is None


def test_study_command_pairs_runs_per_seed(tmp_path, capsys):
    out = tmp_path / "study.json"
    assert main(["study", "--tasks", "digits", "--models", "mlp", "--seeds", "2",
                 "--set", "phases=[1,1,1]", "--set", "mlp_hidden=[16]",
                 "--set", 'backend="torch"', "--out", str(out),
                 "--work", str(tmp_path / "runs")]) == 0
    result = json.loads(out.read_text())
    (cell,) = result["cells"]
    assert [run["seed"] for run in cell["runs"]] == [0, 1]
    assert cell["paired"]["n"] == 2
    assert "| digits | mlp |" in capsys.readouterr().out
    assert main(["study", "--seeds", "2", "--set", "sparsity=2", "--out", str(out)]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
