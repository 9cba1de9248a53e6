"""The GPU check: every step that proves dsd_kernels on a CUDA device, in one command.

    python bench/gpu_check.py --out bench/results/gpu-2026-12-07
    python bench/gpu_check.py --dry-run                  # the steps, commands and budgets
    python bench/gpu_check.py --only tests-ops,bench-optim --out DIR   # rerun some steps
    python bench/gpu_check.py --rehearse --out DIR       # every step on this CPU, tiny sizes

Runs from a checkout, installed or not (the checkout and its src/ go on the steps'
PYTHONPATH). Each step is a process of its own under its own time limit: one that runs out of
time is stopped, recorded as "timed out", and the next step runs. Everything is written as it
comes into the --out folder, so a run stopped at any point keeps what it measured:

    summary.json        environment, each step (status, seconds, budget), test counts and
                        failures, the goals and the first calls; rewritten after every step
    log.txt             every step's output, appended as it runs
    selftest.json       the self-test's table
    threshold.json, mask.json, optim.json, step_overhead.json, semi_structured.json
                        the bench scripts' rows

The C++ library (CPU kernels and host helpers) is built once, by its own step, into
$DSD_KERNELS_CACHE or the work folder; if that step fails, later steps run without it instead
of building it again. A step that cannot run on the device (the semi-structured kernels in
a CPU rehearsal) is recorded as "skipped" with its reason. The exit status is 0 when every
step passed or was skipped (goals are reported, not enforced), 1 otherwise, 2 for bad
arguments. docs/gpu.md describes the steps and the goals.
"""

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from _goals import first_calls, judge
from _timing import print_table, write_rows

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 500  # the whole run on one H100
FAMILIES = ("threshold", "masks", "apply masks", "SGD step", "Adam step", "AdamW step",
            "self-test", "stream safety", "semi-structured")
OPS = FAMILIES[:6]
# The suites whose cases take a `device` parameter, and the export's CUDA conversion: their
# CUDA cases are selected by name.
DEVICE_TESTS = ("tests/test_threshold.py", "tests/test_mask.py", "tests/test_histogram.py",
                "tests/test_optim.py", "tests/test_nm.py", "tests/test_zeros_masks.py",
                "tests/test_semi_structured.py")
# The suites that run wholly on CUDA when a GPU is present (the stream test on CUDA only).
TRITON_TESTS = ("tests/test_triton_backend.py", "tests/test_triton_cache.py",
                "tests/test_triton_convert.py", "tests/test_triton_streams.py")
BENCH_FILES = ("threshold.json", "mask.json", "optim.json", "step_overhead.json",
               "semi_structured.json")
GOAL_NUMEL = {"cuda": 100_000_000, "cpu": 100_000}  # the goals' single-tensor case
# The goals' case first: a step stopped at its time limit has measured it.
SIZES = {"cuda": "1e8,resnet50", "cpu": "1e5,1e4"}
MIN_TIME = {"cuda": 0.2, "cpu": 0.05}
PYTEST_LINE = re.compile(r"^(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")


@dataclass
class Step:
    name: str
    command: list[str]
    budget_s: float
    covers: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    fresh: tuple[Path, ...] = ()  # files and folders removed before the step runs
    missing: tuple[str, ...] = ()  # files the step would take that this checkout lacks
    junit: Path | None = None
    skip: str | None = None  # why the step cannot run on this device: recorded, not run


def plan(device: str, out: Path, work: Path) -> list[Step]:
    """The steps in order. Budgets sum to TOTAL_BUDGET_S."""
    py = sys.executable
    sizes, min_time = SIZES[device], str(MIN_TIME[device])
    rehearsal = device == "cpu"

    def pytest(name, files, budget_s, covers, keyword=None):
        present = tuple(f for f in files if (ROOT / f).exists())
        junit = work / f"{name}.xml"
        command = [py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE",
                   "--durations=15", f"--junitxml={junit}"]
        # Interpreted Triton cases take seconds each: the rehearsal runs the fast ones.
        command += ["-m", "not slow"] if rehearsal else []
        command += ["-k", keyword] if keyword else []
        return Step(name, command + list(present), budget_s, covers, fresh=(junit,),
                    missing=tuple(sorted(set(files) - set(present))), junit=junit)

    def bench(op, budget_s, covers, *options):
        cache = work / f"triton-{op}"  # empty: the first calls compile, as on a first use
        rows = out / f"{op}.json"
        return Step(f"bench-{op.replace('_', '-')}",
                    [py, f"bench/bench_{op}.py", "--device", device, *options,
                     "--out", str(rows)], budget_s, covers,
                    env={"TRITON_CACHE_DIR": str(cache)}, fresh=(cache, rows))

    sized = ("--sizes", sizes, "--min-time", min_time)
    return [
        Step("environment", [py, "bench/_timing.py", "--device", device,
                             "--out", str(work / "environment.json")], 15),
        # ninja compiles the 8 sources in parallel: about the slowest file on 16 cores.
        Step("cpp-build", [py, "-c", "import dsd_kernels; dsd_kernels.use_backend('cpp')"], 60),
        Step("selftest", [py, "-m", "dsd_kernels.selftest", "--device", device,
                          "--json", str(out / "selftest.json")], 60, ("self-test",) + OPS,
             fresh=(out / "selftest.json",)),
        pytest("tests-ops", DEVICE_TESTS, 90, OPS, keyword=device),
        pytest("tests-triton", TRITON_TESTS, 75, OPS + ("stream safety",)),
        bench("threshold", 45, ("threshold",), *sized),
        bench("mask", 45, ("masks", "apply masks"), *sized),
        # AdamW first: a step stopped at its limit has measured the fused goals' rows.
        bench("optim", 45, ("SGD step", "AdamW step"), "--optimizers",
              "AdamW,SGD,RMSprop", *sized),
        bench("step_overhead", 35, ("AdamW step",), "--min-time", min_time),
        Step("bench-semi-structured",
             [py, "bench/bench_semi_structured.py", "--device", device, "--min-time", min_time,
              "--out", str(out / "semi_structured.json")], 30, ("semi-structured",),
             fresh=(out / "semi_structured.json",),
             skip="torch's semi-structured kernels run on CUDA only" if rehearsal else None),
    ]


class Interrupted(Exception):
    """SIGTERM or SIGINT: the step in flight is stopped and recorded, then the run ends."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _environ(device: str, work: Path, cpp_failed: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(work / "triton"))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("DSD_KERNELS_CACHE", str(work / "cpp"))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the Triton backend on CPU tensors, as CI runs it
    if cpp_failed:
        # No second attempt at the build: "auto" logs why and serves CPU tensors with torch.
        env["CXX"] = str(work / "no-compiler-after-a-failed-build")
    return env


def _remove(paths) -> None:
    """An earlier run's files and folders."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _selftest(path: Path) -> dict:
    """The self-test's verdict and its failing checks, from its JSON table."""
    if not path.exists():
        return {"error": "no JSON table (the self-test stopped before writing it)"}
    table = json.loads(path.read_text())
    rows = table.get("rows", [])
    failed = [" ".join(str(r.get(k, "")) for k in ("backend", "device", "op", "dtype", "case"))
              + f": {r.get('detail', '')}" for r in rows if not r.get("ok")]
    return {"ok": table.get("ok"), "checks": len(rows), "failed": failed[:50]}


def _tests(junit: Path, output: str) -> dict:
    """Counts and failures from pytest's JUnit XML; from its -v lines if it was stopped
    before writing the XML."""
    if not junit.exists():
        outcomes = collections.Counter()
        failures = []
        for line in output.splitlines():
            found = PYTEST_LINE.match(line)
            if found:
                outcomes[found[2]] += 1
                if found[2] in ("FAILED", "ERROR"):
                    failures.append(f"{found[1]} ({found[2].lower()})")
        return {"stopped": "no JUnit XML: counts from the log", "tests": sum(outcomes.values()),
                "outcomes": dict(outcomes), "failed": failures}
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            found = case.find(kind)
            if found is not None:
                message = (found.get("message") or "").partition("\n")[0][:300]
                failures.append(f"{case.get('classname')}::{case.get('name')} ({kind}): "
                                f"{message}")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return dict(counts, seconds=float(suite.get("time", 0)), failed=failures)


class Run:
    """The steps of one run and the summary they fill in."""

    def __init__(self, device: str, out: Path, work: Path, rerun: bool):
        self.device, self.out, self.work = device, out, work
        self.summary_path = out / "summary.json"
        self.log_path = out / "log.txt"
        self.summary = {"device": device, "environment": None, "steps": [], "selftest": None,
                        "tests": {}, "goals": [], "first_calls": []}
        if rerun and self.summary_path.exists():  # keeps the other steps' records
            self.summary.update(json.loads(self.summary_path.read_text()))
        elif not rerun:  # nothing of an earlier run may pass for this one's
            for name in ("summary.json", "log.txt", "selftest.json") + BENCH_FILES:
                (out / name).unlink(missing_ok=True)

    def save(self) -> None:
        rows = {}
        for name in BENCH_FILES:
            path = self.out / name
            rows[name] = json.loads(path.read_text()) if path.exists() else []
        self.summary["goals"] = judge(rows, GOAL_NUMEL[self.device])
        self.summary["first_calls"] = first_calls(rows)
        write_rows(self.summary_path, self.summary)

    def record(self, name: str) -> dict:
        """A new record for the step, in place of an earlier run's."""
        steps, record = self.summary["steps"], {"name": name}
        index = next((i for i, s in enumerate(steps) if s["name"] == name), len(steps))
        steps[index:index + 1] = [record]
        return record

    def run_step(self, step: Step) -> str:
        if step.skip:
            return self.skip_step(step)
        cpp_failed = any(s["name"] == "cpp-build" and s.get("status") != "passed"
                         for s in self.summary["steps"])
        record = self.record(step.name)
        record.update(command=shlex.join(step.command), budget_s=step.budget_s,
                      status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      missing=list(step.missing), without_cpp=cpp_failed)
        _remove(step.fresh)
        env = dict(_environ(self.device, self.work, cpp_failed), **step.env)
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            offset = log.tell()
            log.write(f"\n===== {step.name} (budget {step.budget_s:g} s): "
                      f"{record['command']}\n")
            log.flush()
            # Its own process group (start_new_session), so a timeout stops the step's children
            # too (ninja, the compilers, pytest's).
            proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            interrupted = None
            try:
                # Inside the try: a signal that lands while "running" is being saved still
                # stops the step and records it.
                record["pid"] = proc.pid
                self.save()
                returncode = proc.wait(timeout=step.budget_s)
                status = "passed" if returncode == 0 else "failed"
            except (subprocess.TimeoutExpired, Interrupted, KeyboardInterrupt) as stop:
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
                if isinstance(stop, subprocess.TimeoutExpired):
                    status = "timed out"
                else:
                    status, interrupted = "interrupted", stop
                log.write(f"\n===== {step.name}: {status} after "
                          f"{time.monotonic() - start:.1f} s\n")
        record.update(status=status, returncode=returncode,
                      seconds=round(time.monotonic() - start, 1))
        del record["pid"]
        with open(self.log_path, errors="replace") as log:
            log.seek(offset)
            output = log.read()
        if status != "passed":  # the reason, at a glance
            record["output_tail"] = [line for line in output.splitlines() if line.strip()][-8:]
        if step.junit is not None:
            self.summary["tests"][step.name] = _tests(step.junit, output)
        if step.name == "selftest":
            self.summary["selftest"] = _selftest(self.out / "selftest.json")
        if step.name == "environment" and status == "passed":
            self.summary["environment"] = json.loads(
                (self.work / "environment.json").read_text())
        self.save()
        print(f"{step.name:<22} {status:<11} {record['seconds']:>6.1f} s "
              f"(budget {step.budget_s:g} s)", flush=True)
        if interrupted is not None:
            raise interrupted
        return status


    def skip_step(self, step: Step) -> str:
        record = self.record(step.name)
        record.update(command=shlex.join(step.command), budget_s=step.budget_s,
                      status="skipped", reason=step.skip, seconds=0.0)
        _remove(step.fresh)  # nothing of an earlier run may pass for this one's
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {step.name}: skipped: {step.skip}\n")
        self.save()
        print(f"{step.name:<22} skipped: {step.skip}", flush=True)
        return "skipped"


def run_steps(steps: list[Step], device: str, out: Path, work: Path, rerun=False) -> Run:
    """Run the steps in order (all of them, whatever each one's outcome, unless the
    environment cannot be recorded: then nothing measured could say where it came from, or
    the run is interrupted). A rerun adds to the output folder's records; else the run
    starts them afresh."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(device, out, work, rerun)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for step in steps:
            if run.run_step(step) != "passed" and step.name == "environment":
                print("the environment could not be recorded (see log.txt); "
                      "--rehearse runs the steps on this CPU", file=sys.stderr)
                break
    except (Interrupted, KeyboardInterrupt) as stop:
        print(f"interrupted ({stop or 'SIGINT'}): the steps after it did not run",
              file=sys.stderr)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return run


def dry_run(steps: list[Step], device: str, out: Path, work: Path) -> None:
    total = sum(s.budget_s for s in steps)
    print(f"gpu_check on {device}: {len(steps)} steps, budgets {total:g} s in all "
          f"(at most {TOTAL_BUDGET_S} s); out {out}; work {work}")
    for i, s in enumerate(steps, 1):
        print(f"{i}. {s.name} ({s.budget_s:g} s)"
              + (f" covers: {', '.join(s.covers)}" if s.covers else ""))
        print(f"   {shlex.join(s.command)}")
        if s.missing:
            print(f"   missing here, left out: {', '.join(s.missing)}")
        if s.skip:
            print(f"   skipped on {device}: {s.skip}")


def report(run: Run) -> None:
    summary = run.summary
    print(f"\nsteps ({run.out}):")
    print_table([{"step": s["name"], "status": s.get("status"), "seconds": s.get("seconds"),
                  "budget": s.get("budget_s")} for s in summary["steps"]],
                ["step", "status", "seconds", "budget"])
    if summary["selftest"]:
        print("\nselftest: " + ", ".join(f"{k} {v}" for k, v in summary["selftest"].items()
                                         if k != "failed"))
        for failure in summary["selftest"].get("failed", [])[:20]:
            print(f"  FAILED {failure}")
    for name, tests in summary["tests"].items():
        print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in tests.items() if k != "failed"))
        for failure in tests.get("failed", [])[:20]:
            print(f"  FAILED {failure}")
    print("\ngoals:")
    print_table([dict(g, value=None if g["value"] is None else round(g["value"], 3))
                 for g in summary["goals"]],
                ["goal", "value", "unit", "limit", "status", "measured_on"])
    semi_structured = run.out / "semi_structured.json"
    if semi_structured.exists():
        print("\n2:4 semi-structured Linear forward against dense (same run):")
        print_table(json.loads(semi_structured.read_text()),
                    ["case", "impl", "seconds", "speedup", "max_abs_diff_over_max_abs"])
    if summary["first_calls"]:
        print("\nfirst call (compile included) and steady state, dsd's rows:")
        print_table(summary["first_calls"], ["file", "case", "impl", "first_call_ms",
                                             "steady_ms"])


def _check_names(p, names, steps):
    unknown = sorted(set(names) - {s.name for s in steps})
    if unknown:
        p.error(f"unknown step {', '.join(unknown)}; the steps are "
                f"{', '.join(s.name for s in steps)}")


def _budgets(p, text, steps) -> dict[str, float]:
    """--budget's NAME=SECONDS pairs."""
    budgets = {}
    for pair in text.split(",") if text else []:
        name, _, seconds = pair.partition("=")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            p.error(f"--budget takes NAME=SECONDS pairs, got {pair!r}")
        if budgets[name] <= 0:
            p.error(f"--budget {pair!r}: the seconds must be positive")
    _check_names(p, list(budgets), steps)
    return budgets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path,
                   help="output folder (default: bench/results/gpu-<date>, or "
                   "rehearsal-<date> with --rehearse)")
    p.add_argument("--work", type=Path, help="builds and caches, kept between runs so a "
                   "rerun of some steps finds them (default: <tmp>/dsd-gpu-check-<device>)")
    p.add_argument("--only", help="comma-separated step names to run (rerun some)")
    p.add_argument("--budget", help="time limits to change, e.g. tests-ops=300,selftest=30")
    p.add_argument("--dry-run", action="store_true", help="list the steps; run nothing")
    p.add_argument("--rehearse", action="store_true",
                   help="run every step on this CPU (Triton interpreted, tiny sizes)")
    args = p.parse_args(argv)
    device = "cpu" if args.rehearse else "cuda"
    date = time.strftime("%Y-%m-%d")
    out = (args.out or ROOT / "bench" / "results" /
           f"{'rehearsal' if args.rehearse else 'gpu'}-{date}").resolve()
    work = (args.work or Path(tempfile.gettempdir()) / f"dsd-gpu-check-{device}").resolve()
    steps = plan(device, out, work)
    budgets = _budgets(p, args.budget, steps)
    for s in steps:
        s.budget_s = budgets.get(s.name, s.budget_s)
    if args.only:
        names = args.only.split(",")
        _check_names(p, names, steps)
        steps = [s for s in steps if s.name in names]
    if args.dry_run:
        dry_run(steps, device, out, work)
        return 0
    run = run_steps(steps, device, out, work, rerun=bool(args.only))
    report(run)
    passed = all(s.get("status") in ("passed", "skipped") for s in run.summary["steps"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
