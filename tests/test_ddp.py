"""DSD under DDP (gloo, CPU): the Python API in a user's loop and `dsd train` under torchrun.
Every rank ends with the same weights, which match a single-process run on the same data; a
torchrun run killed mid-save resumes on another world size."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dsd_kernels as dk
from dsd import DSD, Plan
from dsd.config import RunConfig
from dsd.train import train

import _kill

SETTINGS = dict(task="digits", model="mlp", phases=[2, 2, 2], sparsity=0.5, mlp_hidden=[32, 16],
                optimizer="sgd", lr=0.05, backend="torch", device="cpu", seed=3)
TRAJECTORY = dict(rtol=1e-4, atol=1e-5)  # DDP sums the ranks' gradients in another order


def _user_loop(rank, world, out_dir):
    """A user's own loop: DDP model, torch.optim.SGD handed to DSD, each rank half a batch."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank,
                                world_size=world)
    dk.use_backend("torch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
              Plan.dsd(2, 2, 2, sparsity=0.6))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 10, generator=gen), torch.randint(0, 4, (256,), generator=gen)
    for epoch in range(dsd.plan.total):
        dsd.epoch_start(epoch)
        for i in range(0, 256, 32):
            xb, yb = x[i:i + 32][rank::world], y[i:i + 32][rank::world]
            dsd.optimizer.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            dsd.optimizer.step()
        if dsd.phase.kind == "sparse":
            for name, p in dsd.named_prunable:
                assert int((p == 0).sum()) == int(0.6 * p.numel()), name
    torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_python_api_under_ddp(tmp_path):
    mp.spawn(_user_loop, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = tmp_path / "single"
    single.mkdir()
    _user_loop(0, 1, str(single))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = torch.load(single / "rank0.pt")
    for key in reference:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], reference[key], **TRAJECTORY)


def _torchrun(world, args, *, script=None, check=True, env=None):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={world}"]
    target = [str(script)] if script else ["-m", "dsd.cli"]
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launch + target + args, capture_output=True, text=True, env=env,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _flags(settings):
    flags = []
    for key, value in settings.items():
        value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(RunConfig.from_mapping(SETTINGS), run_dir, quiet=True)
    return run_dir


def _close(run_a, run_b):
    a, b = (torch.load(run / "model.pt") for run in (run_a, run_b))
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TRAJECTORY)


@pytest.mark.slow
def test_dsd_train_under_torchrun_matches_single_process(tmp_path, single_process_run):
    run_dir = tmp_path / "ddp"
    result = _torchrun(2, ["train", *_flags(SETTINGS), "--out", str(run_dir)])
    assert result.stdout.count("DSD on digits / mlp") == 1  # rank 0 alone reports
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    _close(run_dir, single_process_run)


# Rank 0 (the only writer) dies mid-way through its Nth checkpoint write (tests/_kill.py).
_KILLER = textwrap.dedent("""
    import os, sys
    import _kill
    from dsd.cli import main

    _kill.die_in_save(int(os.environ["KILL_AT"]))
    sys.exit(main())
""")


@pytest.mark.slow
def test_killed_torchrun_run_resumes_on_another_world_size(tmp_path, single_process_run):
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    run_dir = tmp_path / "ddp"
    killed = _torchrun(2, ["train", *_flags(SETTINGS), "--out", str(run_dir), "--quiet"],
                       script=script, check=False, env=_kill.subprocess_env(KILL_AT="3"))
    assert killed.returncode != 0 and not (run_dir / "model.pt").exists()
    _torchrun(3, ["train", "--resume", str(run_dir), "--quiet"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 3
    _close(run_dir, single_process_run)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--seed", "-5"], "dsd: error: --seed must be an integer in [0, 2**32 - 1], got -5"),
    (["--epochs", "3"], "dsd: error: unrecognized arguments: --epochs 3"),
])
def test_a_bad_option_under_torchrun_is_one_line_from_rank_0(tmp_path, args, message):
    result = _torchrun(2, ["train", *args, "--out", str(tmp_path / "run")], check=False)
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    assert result.stderr.count("dsd: error:") == 1 and message in result.stderr
    assert "[rank 1]" not in result.stderr and "dsd/cli.py" not in result.stderr  # no traceback
