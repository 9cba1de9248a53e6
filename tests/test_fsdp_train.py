"""`dsd train --shard` (FSDP2, gloo, CPU): a sharded run follows a single-process run (the
same masks, the zeros kept exactly), its DCP checkpoints hold the masks, and a run killed in
the middle of a checkpoint resumes bit-exactly on the same world size and with exact masks
on another (2 -> 4 -> 1 processes)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from dsd.config import RunConfig
from dsd.train import RunError, dry_run, train
from dsd_kernels.optim.masked import SHARDED_MASK

import _kill

# Ends sparse: model.pt's zeros are the masks. RMSprop takes the general masked step (the
# fused one on FSDP2 shards: tests/test_distributed.py). Tensors from a file: a process starts
# faster than on an embedded task (no scikit-learn), and the tests start 12 of them.
SETTINGS = dict(task="tensors", model="mlp", phases=[1, 3], sparsity=0.5, mlp_hidden=[32, 16],
                optimizer="rmsprop", lr=0.01, backend="torch", device="cpu", seed=3)
TRAJECTORY = dict(rtol=1e-4, atol=1e-5)  # the ranks' gradients are summed in another order
# S-D with its baseline, fused Adam: the baseline branches off before any step.
SPARSE_FIRST = dict(phases=[1, 1], first_phase="sparse", optimizer="adam", baseline=True)

# Rank 0 dies (tests/_kill.py) in its Nth checkpoint: in the middle of writing its slices
# (KILL_IN=slices), or of writing last.pt once every rank has written its slices (file).
_KILLER = textwrap.dedent("""
    import os, sys
    import torch.distributed.checkpoint as dcp
    import _kill
    from dsd.cli import main

    real_save, calls = dcp.save, [0]

    def dying_save(*args, **kwargs):
        calls[0] += 1
        last = calls[0] == int(os.environ["KILL_AT"])
        if last and os.environ["KILL_IN"] == "slices":
            _kill.die_in_save(3)
        result = real_save(*args, **kwargs)
        if last and os.environ["KILL_IN"] == "file":
            _kill.die_in_save(1)
        return result

    if os.environ["RANK"] == "0":
        dcp.save = dying_save
    sys.exit(main())
""")


def _flags(settings):
    flags = []
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def _start(args, *, world=1, script=None, env=None) -> subprocess.Popen:
    """`dsd ARGS` started on `world` torchrun processes (1: a plain process)."""
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={world}"] if world > 1 else [])
    target = [str(script)] if script else ["-m", "dsd.cli"]
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(launch + target + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen, *, check=True) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    if check:
        assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _dsd(args, *, world=1, check=True):
    return _finish(_start(args, world=world), check=check)


def _start_killed(run_dir, world, kill_at, kill_in, args) -> subprocess.Popen:
    """`dsd ARGS` whose rank 0 dies inside its `kill_at`th checkpoint (`kill_in`: _KILLER)."""
    script = run_dir.parent / "killer.py"
    script.write_text(_KILLER)
    return _start(args + ["--quiet"], world=world, script=script,
                  env=_kill.subprocess_env(KILL_AT=str(kill_at), KILL_IN=kill_in))


def _finish_killed(process, run_dir):
    result = _finish(process, check=False)
    assert result.returncode != 0 and not (run_dir / "model.pt").exists(), result.stderr[-2000:]


def _model(run_dir):
    return torch.load(run_dir / "model.pt")


def _checkpoint_tensors(run_dir, tmp_path):
    """The tensors of run_dir's last checkpoint, gathered whole from its DCP directory."""
    pointer = torch.load(run_dir / "checkpoints" / "last.pt")
    whole = tmp_path / "whole.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / pointer["shards"], whole)
    return pointer, torch.load(whole)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run, the same run sharded over 2 processes, and one killed in its
    third checkpoint (it holds the second, in the sparse phase); an S-D run with its baseline
    on one process, with and without --shard."""
    root = tmp_path_factory.mktemp("fsdp")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=gen)
    torch.save({"x": x, "y": (x @ torch.randn(16, 4, generator=gen)).argmax(1)},
               root / "data.pt")
    settings = {**SETTINGS, "data": str(root / "data.pt")}
    # Together: the runs mostly wait (rendezvous, collectives, fsync), not compute.
    sharded = _start(["train", *_flags(settings), "--shard", "--out", str(root / "sharded"),
                      "--quiet"], world=2)
    killed = _start_killed(root / "killed", 2, 3, "slices",
                           ["train", *_flags(settings), "--shard", "--out", str(root / "killed")])
    alone = _start(["train", *_flags({**settings, **SPARSE_FIRST}), "--shard", "--out",
                    str(root / "alone"), "--quiet"])
    train(RunConfig.from_mapping(settings), root / "single", quiet=True)
    train(RunConfig.from_mapping({**settings, **SPARSE_FIRST}), root / "unsharded", quiet=True)
    _finish(sharded)
    _finish_killed(killed, root / "killed")
    _finish(alone)
    return root


@pytest.mark.slow
def test_sharded_run_follows_single_process_and_keeps_zeros(runs):
    summary = json.loads((runs / "sharded" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["shard"]
    single, sharded = _model(runs / "single"), _model(runs / "sharded")
    assert single.keys() == sharded.keys()
    for key in single:  # model.pt: whole tensors on CPU, as without --shard
        assert sharded[key].device.type == "cpu" and sharded[key].shape == single[key].shape
        assert torch.equal(sharded[key] == 0, single[key] == 0), key
        torch.testing.assert_close(sharded[key], single[key], **TRAJECTORY)
    for name in ("hidden.0.weight", "hidden.1.weight", "out.weight"):
        assert (sharded[name] == 0).float().mean() == 0.5, name


@pytest.mark.slow
def test_one_process_shard_equals_the_unsharded_run_bit_for_bit(runs):
    assert json.loads((runs / "alone" / "summary.json").read_text())["world_size"] == 1
    for name in ("model.pt", "baseline_model.pt"):
        sharded, unsharded = (torch.load(runs / run / name) for run in ("alone", "unsharded"))
        for key in unsharded:
            assert torch.equal(sharded[key], unsharded[key]), (name, key)


@pytest.mark.slow
def test_dcp_checkpoint_holds_the_masks(runs, tmp_path):
    pointer, tensors = _checkpoint_tensors(runs / "killed", tmp_path)
    assert (pointer["arm"], pointer["next_epoch"], pointer["world_size"]) == ("dsd", 2, 2)
    assert sorted(tensors) == ["model", "optimizer"] and "masked" not in pointer
    final = _model(runs / "sharded")
    # Every parameter's optimizer state holds its mask, all True where unmasked.
    state = tensors["optimizer"]["state"]
    assert sorted(state) == sorted(final)
    masks = {name: entry[SHARDED_MASK] for name, entry in state.items()}
    assert sorted(name for name, mask in masks.items() if not mask.all()) == [
        "hidden.0.weight", "hidden.1.weight", "out.weight"]
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == final[name].shape
        if not mask.all():
            assert torch.equal(mask, final[name] != 0), name  # the masks kept to the end
            assert torch.equal(tensors["model"][name] != 0, mask), name


@pytest.mark.slow
def test_killed_sharded_run_resumes_on_the_same_and_other_world_sizes(runs, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(runs / "killed", same)
    shutil.copytree(runs / "killed", other)
    resuming = _start(["train", "--resume", str(same), "--quiet"], world=2)
    # 2 -> 4: killed writing last.pt of its second checkpoint, whose slices are all written,
    # so 4 -> 1 resumes from the first, written by 4 ranks.
    moving = _start_killed(other, 4, 2, "file", ["train", "--resume", str(other)])
    _finish(resuming)
    uninterrupted = _model(runs / "sharded")
    resumed = _model(same)
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    _finish_killed(moving, other)
    pointer = torch.load(other / "checkpoints" / "last.pt")
    assert (pointer["world_size"], pointer["next_epoch"]) == (4, 3)
    assert len(list((other / "checkpoints").glob("last-*"))) == 2  # the new one, unnamed
    _dsd(["train", "--resume", str(other), "--quiet"])
    assert json.loads((other / "summary.json").read_text())["world_size"] == 1
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["last.pt"]
    moved = _model(other)
    for key in uninterrupted:
        assert torch.equal(moved[key] == 0, uninterrupted[key] == 0), key
        torch.testing.assert_close(moved[key], uninterrupted[key], **TRAJECTORY)


@pytest.mark.slow
def test_changed_zeros_refuse_to_resume(runs, tmp_path):
    run_dir = tmp_path / "edited"
    shutil.copytree(runs / "killed", run_dir)
    pointer, tensors = _checkpoint_tensors(run_dir, tmp_path)
    mask = tensors["optimizer"]["state"]["hidden.1.weight"][SHARDED_MASK]
    pruned = (~mask).nonzero()[0].tolist()
    tensors["model"]["hidden.1.weight"][tuple(pruned)] = 0.5
    torch.save(tensors, tmp_path / "edited.pt")
    shards = run_dir / "checkpoints" / pointer["shards"]
    shutil.rmtree(shards)
    torch_save_to_dcp(tmp_path / "edited.pt", shards)
    before = sorted(p.name for p in run_dir.rglob("*"))
    result = _dsd(["train", "--resume", str(run_dir)], check=False)
    assert result.returncode == 2
    assert result.stderr == (f"dsd: error: cannot resume: {run_dir}/checkpoints/last.pt holds "
                             "non-zero weights that the mask of hidden.1.weight prunes: its "
                             "weights or its masks were changed after it was saved\n")
    assert sorted(p.name for p in run_dir.rglob("*")) == before


@pytest.mark.slow
def test_a_sharded_checkpoint_without_shard_names_the_flag(runs, tmp_path):
    run_dir = tmp_path / "unsharded"
    shutil.copytree(runs / "killed", run_dir)
    config = RunConfig.from_mapping({**SETTINGS, "data": str(runs / "data.pt"), "shard": False})
    (run_dir / "config.toml").write_text(config.to_toml())
    with pytest.raises(RunError, match=r"^cannot resume: .*last.pt was written by a run with "
                                       r"--shard; resume it with --shard$"):
        train(config, run_dir, quiet=True)


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint_says_to_finish_the_run(runs):
    from dsd.train.init_file import read_init

    last = runs / "killed" / "checkpoints" / "last.pt"
    with pytest.raises(RunError, match=rf"^init file {last} is a sharded \(--shard\) checkpoint "
                                       r"after epoch 2 of 4: its weights are slices in last-\w+/, "
                                       rf"not one state_dict; finish the run with `dsd train "
                                       rf"--resume {runs / 'killed'}` and pass "
                                       rf"{runs / 'killed'}/model.pt$"):
        read_init(str(last))


def test_shard_round_trips_and_dry_run_names_the_units(tmp_path):
    settings = {**SETTINGS, "task": "digits"}
    config = RunConfig.from_mapping({**settings, "shard": True})
    (tmp_path / "config.toml").write_text(config.to_toml())
    assert RunConfig.from_toml(tmp_path / "config.toml") == config
    assert not RunConfig.from_mapping(settings).shard
    assert "sharded (--shard): FSDP2 fully_shard on hidden.0, hidden.1, out and the root " \
        "model" in dry_run(config)
    assert "sharded" not in dry_run(RunConfig.from_mapping(settings))


def test_shard_units_are_the_blocks_and_tied_layers_stay_with_the_root():
    from dsd.world import shard_units

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Module()
            self.body.embed = torch.nn.Embedding(10, 4)
            self.body.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.body.norm = torch.nn.LayerNorm(4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.body.embed.weight
            self.extra = torch.nn.Linear(4, 2)
            self.act = torch.nn.ReLU()

    model = Tied()
    assert shard_units(model) == [*model.body.blocks, model.extra]
    model.head.weight = torch.nn.Parameter(torch.zeros(10, 4))  # untied: its own unit
    assert shard_units(model) == [*model.body.blocks, model.head, model.extra]
