"""Run options at their limits: each bad value is one line naming the option."""

import os
from dataclasses import fields

import pytest

from dsd import cli
from dsd.cli import main
from dsd.config import ConfigError, RunConfig

CPUS = os.cpu_count() or 1
HUGE = 99999999999999999999999  # over int64: torch would fail "Overflow when unpacking long long"


def _refused(capsys, *flags) -> str:
    # A dry run: were the value accepted, nothing would start threads or processes.
    assert main(["train", *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flag", ["--threads", "--workers"])
def test_threads_and_workers_are_at_most_the_cpus(capsys, flag):
    err = _refused(capsys, flag, "100000")
    assert err == (f"dsd: error: {flag} must be an integer in [0, {CPUS}] (at most this "
                   f"machine's CPUs), got 100000\n")
    assert RunConfig.from_mapping({flag[2:]: CPUS}).to_dict()[flag[2:]] == CPUS


@pytest.mark.parametrize("seed", [HUGE, 2**32, -1])
def test_a_seed_outside_numpys_range_names_seed(capsys, seed):
    err = _refused(capsys, "--seed", str(seed))
    assert err == f"dsd: error: --seed must be an integer in [0, 2**32 - 1], got {seed}\n"


def test_the_largest_seed_trains(tmp_path, capsys):
    """The seed reaches torch (initialisation, batch order) and NumPy (the drawn examples and
    noisy labels) without overflow."""
    assert main(["train", "--task", "digits", "--phases", "1,1,1", "--mlp-hidden", "8",
                 "--train-examples", "200", "--label-noise", "0.1", "--backend", "torch",
                 "--seed", str(2**32 - 1), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "summary.json").exists()


INT_KEYS = [f.name for f in fields(RunConfig) if f.type in (int, list[int])]


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_integer_option_refuses_a_value_over_int64_naming_it(key):
    value = [HUGE] if RunConfig.__dataclass_fields__[key].type == list[int] else HUGE
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_mapping({key: value})
    assert refused.value.key == key and str(refused.value).startswith(f"{key} must be")


def test_an_integer_option_over_int64_on_the_command_line_names_the_flag(capsys):
    err = _refused(capsys, "--mlp-hidden", f"8,{HUGE}")
    assert err == f"dsd: error: --mlp-hidden must be at most 2**63 - 1, got [8, {HUGE}]\n"


@pytest.mark.parametrize("argv, message", [
    (["train", "--seed", "-5", "--dry-run"], "dsd: error: --seed must be"),
    (["train", "--epochs", "3"], "dsd: error: unrecognized arguments: --epochs 3"),
])
def test_under_torchrun_rank_0_reports_a_bad_option_and_the_others_wait_silently(
        capsys, monkeypatch, argv, message):
    def run(rank):
        monkeypatch.setenv("RANK", str(rank))
        try:
            status = main(argv)
        except SystemExit as leaving:  # argparse's errors
            status = leaving.code
        return status, capsys.readouterr().err

    waits = []  # torchrun stops a waiting rank once rank 0 has failed: here the wait ends
    monkeypatch.setattr(cli.time, "sleep", lambda s: waits.append((s, capsys.readouterr().err)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, err = run(0)
    assert status == 2 and err.count(message) == 1 and not waits
    status, err = run(1)
    assert status == 2 and waits == [(cli.OTHER_RANKS_WAIT_S, "")]  # silent while it waits
    assert err.startswith("[rank 1] ") and err.count(message) == 1  # only a rank's own error
