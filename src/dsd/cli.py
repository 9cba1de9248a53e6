"""The `dsd` command: `dsd train`, `dsd study`, `dsd info`."""

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import sys
import time
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from . import __version__
from .config import ConfigError, RunConfig
from .study.budgets import BUDGETS, REGIMES
from .world import launched_rank

# The trainer and the study's runs (torch-heavy, plots) are imported by the subcommand that
# needs them, so that `dsd --help` and `dsd info` start fast.


def _comma_list(item_type):
    def parse(text: str) -> list:
        items = [part.strip() for part in text.split(",") if part.strip()]
        try:
            return [item_type(part) for part in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item_type.__name__}s, got {text!r}") from None
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error})") \
            from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 3}}', got "
                                         f"{text!r}")
    return value


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; only the flags given end up in the namespace."""
    group = parser.add_argument_group("run options (also config-file keys, with _ for -)")
    for f in fields(RunConfig):
        flag = _flag(f.name)
        default = f.metadata.get("shown_default") or (
            f.default if f.default_factory is MISSING else f.default_factory())
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS,
                  "help": f"{f.metadata['help']} (default: {default})"}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type is dict:
            kwargs["type"] = _json_object
            kwargs["metavar"] = "JSON"
        elif getattr(f.type, "__origin__", None) is list:
            kwargs["type"] = _comma_list(f.type.__args__[0])
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = f.type
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsd", description="Dense-Sparse-Dense training (Han et al., ICLR 2017).")
    parser.add_argument("--version", action="version", version=f"dsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="run DSD on an embedded task",
        description="Run DSD on an embedded task (no download). Options come from the "
                    "defaults, then --config FILE (TOML), then flags.")
    train_parser.add_argument("--config", type=Path, help="TOML file of run options")
    train_parser.add_argument("--out", type=Path, help="run directory (default: "
                              "runs/TASK-MODEL-sSEED-TIME); an existing one with the same "
                              "config resumes")
    train_parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                              help="resume the run in RUN_DIR with its own config")
    train_parser.add_argument("--quiet", action="store_true",
                              help="no progress bars or per-epoch lines; only the summary")
    train_parser.add_argument("--dry-run", action="store_true",
                              help="check the data, model and --init file, list the parameters "
                                   "and what the plan prunes of each, and exit (nothing written)")
    _add_config_flags(train_parser)

    study_parser = commands.add_parser(
        "study", help="where DSD helps: DSD vs a tuned dense baseline per regime, paired over "
                      "seeds")
    study_parser.add_argument("--budget", choices=list(BUDGETS), default="full",
                              help="quick: a few seconds (a check); full: the study of "
                                   "docs/study.md (about 1.5 hours on 2 CPU cores with --jobs 2); "
                                   "regularised: both arms also tune dropout and weight decay")
    study_parser.add_argument("--tasks", type=_comma_list(str), default=None,
                              help="only these of the budget's tasks")
    study_parser.add_argument("--regimes", type=_comma_list(str), default=None,
                              help=f"only these regimes ({', '.join(REGIMES)})")
    study_parser.add_argument("--seeds", type=int, default=None,
                              help="seeds per cell (default: the budget's)")
    study_parser.add_argument("--jobs", type=int, default=1,
                              help="runs trained at once, each in its own process")
    study_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="a run option for every run, as in a config file "
                                   "(e.g. --set device=\"cuda\"); repeatable")
    study_parser.add_argument("--out", type=Path, required=True,
                              help="directory for study_BUDGET.json/.md and one plot per regime")
    study_parser.add_argument("--work", type=Path, default=Path("runs/study"),
                              help="directory for the runs (an interrupted study resumes)")

    info_parser = commands.add_parser(
        "info", help="show the version, device and dsd_kernels backends",
        description="Show the versions, the device and the dsd_kernels backends.")
    info_parser.add_argument("--check", action="store_true",
                             help="then run the kernels' self-test (python -m "
                                  "dsd_kernels.selftest) on every backend and device here; "
                                  "exit status 1 if a check fails")
    return parser


def _train(args) -> int:
    from .train import RunDirError, RunError, dry_run, load_config, report, train

    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    if args.resume is not None:
        if given or args.config or args.out:
            raise RunError("--resume takes the run's own config: give no other run options")
        option, out, config = "--resume", args.resume, None
    else:
        base = RunConfig.from_toml(args.config) if args.config else None
        try:
            config = RunConfig.from_mapping(given, base=base, source="command line")
        except ConfigError as error:
            if error.key in given:
                raise error.labelled(_flag(error.key)) from None
            raise
        option, out = ("--out", args.out) if args.out else ("run directory", None)
    try:
        if config is None:  # --resume: the run's own config
            config = load_config(out)
        if args.dry_run:
            print(dry_run(config), end="")
            return 0
        summary = train(config, out, quiet=args.quiet)
    except RunDirError as error:
        raise RunError(f"{option} {error}") from None
    except ConfigError as error:  # e.g. optimizer arguments its constructor refuses
        if error.key in given:
            raise error.labelled(_flag(error.key)) from None
        raise
    except KeyboardInterrupt as interrupt:
        where = getattr(interrupt, "run_dir", out)
        if where is not None:
            print(f"\ninterrupted; continue with: dsd train --resume {where}", file=sys.stderr)
        return 130
    if launched_rank() == 0:  # under torchrun, rank 0 reports
        print(report.table(summary), end="")
    if config.shard and os.environ.get("WORLD_SIZE", "1") != "1":
        # FSDP2 keeps gloo's process group alive past its destruction, and releasing it in
        # interpreter finalization, while gloo's threads still hold tensors, aborts the
        # process at random (SIGABRT: torchrun would report the finished run as failed). The
        # run's files are written and closed: the rank leaves without finalization.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def parse_settings(items: list[str]) -> dict:
    """Run options from KEY=VALUE strings (TOML values), as --set gives them."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            settings.update(tomllib.loads(f"{key.strip()} = {value}"))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"--set {item!r}: not a TOML value ({error})") from None
    return settings


def _study(args) -> int:
    """`dsd study`: the study's runs in --work, its results into --out, the table printed."""
    from .study import run_study, table, write_outputs

    result = run_study(budget=args.budget, tasks=args.tasks, regimes=args.regimes,
                       seeds=args.seeds, settings=parse_settings(args.set), work=args.work,
                       jobs=args.jobs, say=lambda line: print(line, file=sys.stderr))
    write_outputs(result, args.out, f"study_{args.budget}")
    print(table(result), end="")
    return 0


def _info(check: bool) -> int:
    import dsd_kernels

    _print_info(dsd_kernels)
    if not check:
        return 0
    from dsd_kernels import selftest

    rows = selftest.run()
    print(selftest.table(rows), end="")
    return 0 if rows and all(row["ok"] for row in rows) else 1


def _print_info(dsd_kernels) -> None:

    print(f"dsd {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name(0)}); training uses it by default")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads); no CUDA device visible")
    print(f"dsd_kernels backends available: {', '.join(dsd_kernels.available_backends())}")
    source = f"DSD_BACKEND={os.environ['DSD_BACKEND']}" if "DSD_BACKEND" in os.environ \
        else "auto"
    try:
        selected = dsd_kernels.selected_backends()
    except (ValueError, dsd_kernels.BackendUnavailable) as reason:
        print(f"selected ({source}): none, ops would fail: {reason}")
        return
    print(f"selected ({source}): "
          + ", ".join(f"{device} -> {name}" for device, name in selected.items()))


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--phases -1,1,1` as `--phases=-1,1,1`: argparse takes a value like -1,1,1 or -1e-3 for
    an option and says "expected one argument"; attached, the value gets checked and named."""
    attached = []
    for token in argv:
        follows_option = attached and attached[-1].startswith("--") and "=" not in attached[-1]
        if follows_option and re.match(r"-\.?\d", token):
            attached[-1] += "=" + token
        else:
            attached.append(token)
    return attached


# How long a rank other than 0 holds back a user error (see _report).
OTHER_RANKS_WAIT_S = 30.0


def main(argv=None) -> int:
    # dsd_kernels logs once which backends it falls back from; show it as a plain line.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    rank = launched_rank()
    usage_error = io.StringIO()  # argparse prints its errors itself: hold them back on rank > 0
    try:
        with contextlib.redirect_stderr(usage_error if rank else sys.stderr):
            args = _parser().parse_args(_attach_negative_values(argv))
    except SystemExit as leaving:
        if leaving.code:
            _report(rank, usage_error.getvalue())
        raise
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "study":
            return _study(args)
        return _info(args.check)
    except ValueError as error:  # RunError, config and plan errors: the message says it all
        _report(rank, f"dsd: error: {error}\n")
        return 2
    except OSError as error:  # e.g. a checkpoint that cannot be written: the disk is full
        _report(rank, f"dsd: error: {error}\n")
        return 1


def _report(rank: int, message: str) -> None:
    """Print a user error once under torchrun, from rank 0. Every rank runs the same command
    and meets the same error, and once rank 0 exits with it torchrun stops the others: they
    wait for that in silence. An error of one rank alone outlives the wait, named by rank."""
    if rank:
        time.sleep(OTHER_RANKS_WAIT_S)
        message = f"[rank {rank}] {message}"
    print(message, end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
