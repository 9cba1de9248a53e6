"""The data tasks end to end through `dsd train`: CIFAR batches from disk with the CIFAR
ResNets, a character-level LSTM on a text file, a tensors file with a user's model factory, a
pretrained start with a sparse-first plan, mixed precision, DataLoader workers, kill and
resume, DDP; and the one-line errors for bad data, factories and init files."""

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from dsd.cli import main
from dsd.config import RunConfig
from dsd.train import report, train
from dsd_kernels.optim import MaskedAdam

import _fake_data
import _kill
from _runs import untimed_rows

TINY = dict(backend="torch", device="cpu", batch_size=16, seed=1)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return _fake_data.write_cifar(tmp_path_factory.mktemp("cifar"), per_batch=8, test=8)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return _fake_data.write_text(tmp_path_factory.mktemp("text") / "corpus.txt", chars=3000)


def _config(**settings) -> RunConfig:
    return RunConfig.from_mapping({**TINY, **settings})


def _same_models(run_a, run_b, names=("model.pt",)):
    for name in names:
        a, b = torch.load(run_a / name), torch.load(run_b / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.fixture
def sparsity_checked_every_step(monkeypatch):
    """After every masked Adam step of a sparse phase, each masked tensor holds exactly its
    plan's number of zeros; every tensor without a mask (batch norms, biases) holds none that
    it did not hold at the start. Returns the list of checked steps."""
    checked = []
    step = MaskedAdam.step

    def checking_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        masks = self.masks
        for group in self.param_groups:
            for p in group["params"]:
                if p in masks:
                    assert int((p == 0).sum()) == math.floor(0.5 * p.numel())
                    assert int(masks[p].sum()) == p.numel() - math.floor(0.5 * p.numel())
                elif masks:
                    assert int((p == 0).sum()) == 0
        if masks:
            checked.append(len(masks))
        return result

    monkeypatch.setattr(MaskedAdam, "step", checking_step)
    return checked


def test_cifar_resnet_prunes_exactly_and_leaves_norms_and_biases(cifar, tmp_path,
                                                                  sparsity_checked_every_step):
    run_dir = tmp_path / "run"
    summary = train(_config(task="cifar10", data=str(cifar), model="resnet20", phases=[1, 1, 1],
                            sparsity=0.5, baseline=True), run_dir, quiet=True)
    # resnet20: 19 convolutions and the classifier; the 19 batch norms and the bias stay out.
    assert set(sparsity_checked_every_step) == {20}
    # 40 training rows less 4 for validation, batches of 16: 3 steps in the sparse epoch.
    assert len(sparsity_checked_every_step) == 3
    layers = json.loads((run_dir / "sparsity.json").read_text())["dsd"][1]
    assert len(layers["start"]) == 20 and not any("bn" in name or "bias" in name
                                                  for name in layers["start"])
    assert summary["model"] == "resnet20" and summary["world_size"] == 1
    final = summary["arms"]["dsd"]["final"]
    assert final["sparsity"] == 0.0  # re-dense: pruned weights regrew
    row = untimed_rows(run_dir)[0]
    assert row["train_acc"] >= 0 and "test_bpc" not in row
    assert (run_dir / "plot.png").stat().st_size > 0


def test_auto_model_of_cifar_is_resnet20_and_dry_run_lists_what_is_pruned(cifar, tmp_path,
                                                                            capsys):
    out = tmp_path / "never"
    assert main(["train", "--task", "cifar10", "--data", str(cifar),
                 "--sparsity", "0.3", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "model resnet20: 269,722 parameters, 20 tensors prunable" in text
    for line in text.splitlines():
        if ".bn" in line or line.split()[0].endswith("bias"):
            assert line.split()[-1] == "-", line  # batch norms and biases are not pruned
    assert f"{math.floor(0.3 * 16 * 3 * 3 * 3):,}" in text  # the stem's pruned count
    assert not out.exists()


def test_text_lstm_reports_bits_per_character(text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--task", "text", "--data", str(text_file), "--model", "lstm",
                 "--seq-len", "32", "--rnn-hidden", "24", "--phases", "1,1,1", "--baseline",
                 "--backend", "torch", "--device", "cpu", "--out", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "final test bits per character: DSD" in printed
    epochs = [line for line in printed.splitlines() if re.search(r" epoch +\d/3 ", line)]
    assert len(epochs) == 5  # the baseline trains from the branch, after epoch 1
    assert all(" val bpc " in line and " test bpc " in line and " acc " not in line
               for line in epochs)
    summary = json.loads((run_dir / "summary.json").read_text())
    for arm in ("dsd", "baseline"):
        final = summary["arms"][arm]["final"]
        assert final["test_bpc"] == pytest.approx(final["test_loss"] / math.log(2))
        assert 0 < final["test_bpc"] < math.log2(10) + 1  # 10 characters: log2(10) is chance
    assert summary["test_bpc_difference"] == pytest.approx(
        summary["arms"]["dsd"]["final"]["test_bpc"]
        - summary["arms"]["baseline"]["final"]["test_bpc"])
    # The embedding, both LSTM matrices and the decoder are pruned; no bias.
    layers = json.loads((run_dir / "sparsity.json").read_text())["dsd"][1]["end"]
    assert sorted(layers) == ["embed.weight", "out.weight", "rnn.weight_hh_l0",
                              "rnn.weight_ih_l0"]
    assert all(value == pytest.approx(0.5, abs=0.01) for value in layers.values())


def test_text_epoch_lines_say_bits_per_character(capsys):
    row = {"arm": "dsd", "epoch": 2, "kind": "sparse", "lr": 0.01, "train_loss": 1.5,
           "val_loss": 1.2, "val_acc": 0.61, "val_bpc": 1.2 / math.log(2)}
    assert report.epoch_line(row, 3) == ("dsd      epoch   2/3  sparse lr 0.01  train loss 1.5000"
                                         "  val bpc 1.7312")
    row.update(test_loss=1.1, test_acc=0.62, test_bpc=1.1 / math.log(2))
    assert report.epoch_line(row, 3).endswith("  val bpc 1.7312  test bpc 1.5870")
    images = {k: v for k, v in row.items() if not k.endswith("_bpc")}
    assert report.epoch_line(images, 3).endswith("  val acc 61.00%  test acc 62.00%")


def test_a_factory_model_on_a_tensors_file(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def build(width, classes=3):
            return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, classes))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "user_nets", raising=False)
    data = _fake_data.write_tensors(tmp_path / "data.pt", n=60, shape=(6,), classes=3)
    run_dir = tmp_path / "run"
    summary = train(_config(task="tensors", data="data.pt", model="user_nets:build",
                            model_args={"width": 12}, phases=[1, 1, 1]), run_dir, quiet=True)
    assert summary["model"] == "user_nets:build"
    saved = RunConfig.from_toml(run_dir / "config.toml")
    assert saved.model_args == {"width": 12} and saved.data == str(data)  # stored absolute
    assert sorted(torch.load(run_dir / "model.pt")) == ["0.bias", "0.weight", "2.bias",
                                                         "2.weight"]
    sys.modules.pop("user_nets", None)


def test_init_then_sparse_first_plan_branches_the_baseline_at_the_start(cifar, tmp_path):
    pretrained = tmp_path / "pretrained"
    train(_config(task="cifar10", data=str(cifar), model="resnet20", phases=[1]), pretrained,
          quiet=True)
    init = torch.load(pretrained / "model.pt")
    run_dir = tmp_path / "sd"
    summary = train(_config(task="cifar10", data=str(cifar), model="resnet20", phases=[1, 1],
                            first_phase="sparse", init=str(pretrained / "model.pt"),
                            baseline=True, lr=1e-3), run_dir, quiet=True)
    assert [p["kind"] for p in summary["phases"]] == ["sparse", "dense"]
    assert [p["lr"] for p in summary["phases"]] == pytest.approx([1e-3, 1e-4])
    assert summary["branch_epoch"] == 0
    # Both arms start from the pretrained weights: the branch point is the init itself.
    branch = torch.load(run_dir / "checkpoints" / "branch.pt", weights_only=True)
    for key, value in init.items():
        assert torch.equal(branch["model"][key], value), key
    start = json.loads((run_dir / "sparsity.json").read_text())
    assert all(v == pytest.approx(0.5, abs=1e-3) for v in start["dsd"][0]["start"].values())
    assert all(v == 0 for v in start["baseline"][0]["start"].values())
    baseline_rows = [row for row in untimed_rows(run_dir) if row["arm"] == "baseline"]
    assert [row["epoch"] for row in baseline_rows] == [1, 2]
    assert [row["lr"] for row in baseline_rows] == pytest.approx([1e-3, 1e-4])


@pytest.mark.slow
def test_workers_and_a_resume_give_the_same_run(cifar, tmp_path):
    """Augmented batches prepared by 2 worker processes equal those of the training process;
    a run hard-killed in the middle of a checkpoint write resumes to the same bits."""
    settings = dict(TINY, task="cifar10", data=str(cifar), model="resnet20", phases=[1, 1, 1],
                    baseline=True)
    reference = tmp_path / "reference"
    train(RunConfig.from_mapping(settings), reference, quiet=True)
    with_workers = tmp_path / "workers"
    train(RunConfig.from_mapping({**settings, "workers": 2}), with_workers, quiet=True)
    _same_models(with_workers, reference, ("model.pt", "baseline_model.pt"))
    killer = textwrap.dedent("""
        import json, sys
        import _kill
        from dsd.config import RunConfig
        from dsd.train import report, train

        _kill.die_in_save(3)  # epoch 1 last.pt, branch.pt, then mid-way through epoch 2's
        train(RunConfig.from_mapping(json.loads(sys.argv[2])), sys.argv[1], quiet=True)
    """)
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", killer, str(killed), json.dumps(settings)],
                            env=_kill.subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 9, result.stderr[-2000:]
    assert not (killed / "model.pt").exists()
    train(RunConfig.from_mapping(settings), killed, quiet=True)
    _same_models(killed, reference, ("model.pt", "baseline_model.pt"))
    assert untimed_rows(killed) == untimed_rows(reference)


@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_mixed_precision_on_cpu(cifar, tmp_path, amp, sparsity_checked_every_step):
    run_dir = tmp_path / amp
    fp16 = amp == "fp16"
    summary = train(_config(task="cifar10", data=str(cifar), model="resnet20", phases=[1, 1, 1],
                            amp=amp, channels_last=True, baseline=fp16), run_dir, quiet=True)
    assert sparsity_checked_every_step  # exact sparsity after every step of the sparse phase
    assert math.isfinite(summary["arms"]["dsd"]["final"]["test_loss"])
    model = torch.load(run_dir / "model.pt")
    assert all(v.dtype == torch.float32 for v in model.values() if v.is_floating_point())
    if fp16:  # the gradient scaler's state travels in the checkpoints the baseline resumes
        branch = torch.load(run_dir / "checkpoints" / "branch.pt", weights_only=True)
        assert branch["scaler"]["scale"] > 0 and "_growth_tracker" in branch["scaler"]


def test_fp16_scaler_state_travels_to_the_baseline(tmp_path):
    """The fast check of fp16 (ResNet convolutions in fp16 take minutes on a CPU)."""
    run_dir = tmp_path / "fp16"
    summary = train(_config(task="digits", mlp_hidden=[16], phases=[1, 1, 1], amp="fp16",
                            baseline=True), run_dir, quiet=True)
    assert math.isfinite(summary["arms"]["baseline"]["final"]["test_loss"])
    branch = torch.load(run_dir / "checkpoints" / "branch.pt", weights_only=True)
    assert branch["scaler"]["scale"] > 0 and "_growth_tracker" in branch["scaler"]


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one(text_file, tmp_path):
    """The text LSTM (no batch norm: the ranks' halves give the global batch's gradient) under
    torchrun with a DataLoader worker per rank, against one process."""
    flags = ["--task", "text", "--data", str(text_file), "--model", "lstm", "--seq-len", "32",
             "--rnn-hidden", "16", "--phases", "1,1,1", "--backend", "torch", "--device", "cpu",
             "--batch-size", "16", "--quiet"]
    single = tmp_path / "single"
    assert main(["train", *flags, "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "dsd.cli", "train", *flags, "--workers", "1", "--out", str(ddp)]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600,
                            env={**_kill.subprocess_env(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    a, b = torch.load(single / "model.pt"), torch.load(ddp / "model.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# ---- bad input: one line naming the problem, no run directory -----------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, cifar):
    tmp_path = tmp_path_factory.mktemp("bad")
    (tmp_path / "not_cifar").mkdir()
    (tmp_path / "notes.pt").write_text("not a torch file")
    (tmp_path / "returns_int.py").write_text("def build():\n    return 3\n")
    other = {"weight": torch.zeros(2, 2)}
    torch.save(other, tmp_path / "foreign.pt")
    pretrained = tmp_path / "pretrained"
    train(_config(task="cifar10", data=str(cifar), model="resnet20", phases=[1]), pretrained,
          quiet=True)
    shapes = torch.load(pretrained / "model.pt")
    shapes["out.weight"] = torch.zeros(7, shapes["out.weight"].shape[1])
    torch.save(shapes, tmp_path / "wrong_shapes.pt")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--task", "cifar10", "--data", "{tmp}/missing"], "missing"),
    (["--task", "cifar10", "--data", "{tmp}/not_cifar"], "not_cifar"),
    (["--task", "tensors", "--data", "{tmp}/notes.pt"], "notes.pt"),
    (["--task", "digits", "--model", "no_such_module_xyz:build"], "no_such_module_xyz"),
    (["--task", "digits", "--model", "returns_int:build"], "returned int, not a torch.nn.Module"),
    (["--task", "cifar10", "--data", "{cifar}", "--init", "{tmp}/foreign.pt"],
     "missing keys stem.weight, bn.weight, bn.bias, bn.running_mean and "),
    (["--task", "cifar10", "--data", "{cifar}", "--init", "{tmp}/wrong_shapes.pt"],
     "out.weight is (7, 64) there, (10, 64) in the model"),
    (["--task", "cifar10", "--data", "{cifar}", "--init", "{tmp}/none.pt"], "none.pt"),
    (["--task", "digits", "--channels-last"], "channels_last needs (C, H, W) image inputs"),
    (["--task", "digits", "--model", "resnet20"], "does not fit"),
])
def test_bad_input_is_one_line_and_leaves_no_run_dir(bad_inputs, cifar, capsys, monkeypatch,
                                                     args, message):
    monkeypatch.chdir(bad_inputs)
    out = bad_inputs / "run"  # shared by the cases: each must leave it absent
    args = [a.format(tmp=bad_inputs, cifar=cifar) for a in args]
    assert main(["train", *args, "--backend", "torch", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("dsd: error: ") and message in error, error
    assert not out.exists()
    sys.modules.pop("returns_int", None)
