"""One `dsd train` per run directory: a second one is refused while the first lives, and a run
killed with SIGKILL leaves nothing behind that blocks the next."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dsd.cli import main
from dsd.config import RunConfig
from dsd.train import RunDirError
from dsd.train.run_dir import claim_run_dir

import _kill

TINY = ["--task", "digits", "--phases", "2,1,1", "--mlp-hidden", "16", "--backend", "torch",
        "--quiet"]

# `dsd train` that trains epoch 1, then says so by creating a file and hangs in epoch 2.
_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dsd.cli import main
    from dsd.train import recipe

    signal_file, args = Path(sys.argv[1]), sys.argv[2:]
    train_epoch = recipe.train_epoch

    def hang_in_epoch_2(arm, epoch, *args, **kwargs):
        if epoch == 1:
            signal_file.touch()
            time.sleep(600)
        return train_epoch(arm, epoch, *args, **kwargs)

    recipe.train_epoch = hang_in_epoch_2
    sys.exit(main(args))
""")


def _start_holder(tmp_path, out):
    signal_file = tmp_path / "in-epoch-2"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(signal_file), "train", *TINY,
                               "--out", str(out)], env=_kill.subprocess_env(),
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not signal_file.exists():
        assert holder.poll() is None, holder.stderr.read()
        assert time.monotonic() < deadline, "the first run never reached epoch 2"
        time.sleep(0.05)
    return holder


def _snapshot(run_dir):
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in run_dir.rglob("*")}


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_lives_and_free_once_it_is_killed(tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    holder = _start_holder(tmp_path, out)
    try:
        before = _snapshot(out)
        for second in (["train", *TINY, "--out", str(out)], ["train", "--resume", str(out)]):
            assert main(second) == 2
            option = "--resume" if "--resume" in second else "--out"
            assert capsys.readouterr().err == (
                f"dsd: error: {option} {out}: another dsd train is running in it; wait for it "
                "to end, or choose another --out\n")
        assert _snapshot(out) == before
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # from epoch 1's checkpoint
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]


def test_a_claimed_run_dir_is_refused_until_its_lock_is_released(tmp_path):
    """The lock in one process: a second open of the directory cannot take it (flock locks
    belong to the open file, not the process)."""
    out = tmp_path / "run"
    config = RunConfig.from_mapping({"task": "digits", "backend": "torch"})
    lock = claim_run_dir(config, out)
    try:
        with pytest.raises(RunDirError, match="another dsd train is running in it"):
            claim_run_dir(config, out)
        assert (out / "config.toml").is_file()
    finally:
        os.close(lock)
    os.close(claim_run_dir(config, out))  # released: the same config takes the directory again
