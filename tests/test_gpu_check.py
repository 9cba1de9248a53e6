"""The GPU check (bench/gpu_check.py) cannot rot without a GPU: its dry run lists steps that
cover every kernel family within the run's budget, a step that runs out of time is recorded
and the run goes on, what was written before an interruption stays, and the goals are judged
from the rows as docs/gpu.md says.
"""

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsd_kernels.semi_structured import SemiStructuredReport

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_semi_structured  # noqa: E402

import gpu_check  # noqa: E402
from _goals import judge  # noqa: E402


@pytest.fixture(params=["cuda", "cpu"])
def steps(request, tmp_path):
    return gpu_check.plan(request.param, tmp_path / "out", tmp_path / "work")


def test_the_steps_cover_every_kernel_family_within_the_budget(steps):
    covered = {family for step in steps for family in step.covers}
    assert covered == set(gpu_check.FAMILIES)
    assert sum(step.budget_s for step in steps) <= gpu_check.TOTAL_BUDGET_S == 500
    names = [step.name for step in steps]
    assert names[:3] == ["environment", "cpp-build", "selftest"]
    assert {"tests-ops", "tests-triton", "bench-threshold", "bench-mask", "bench-optim",
            "bench-step-overhead", "bench-semi-structured"} <= set(names)
    triton = next(step for step in steps if step.name == "tests-triton")
    # The stream test runs wherever the checkout holds it.
    assert "tests/test_triton_streams.py" in triton.command + list(triton.missing)
    for step in steps:
        assert all((ROOT / arg).exists() for arg in step.command if arg.startswith("tests/"))
        assert "mnist1d" not in " ".join(step.command)


def test_cuda_steps_select_cuda_cases_and_goal_sizes(tmp_path):
    steps = {s.name: s for s in gpu_check.plan("cuda", tmp_path / "out", tmp_path / "work")}
    ops = steps["tests-ops"].command
    assert ops[ops.index("-k") + 1] == "cuda"
    assert "not slow" not in steps["tests-triton"].command  # no case is slow on a GPU
    for name in ("bench-threshold", "bench-mask", "bench-optim"):
        command = steps[name].command
        assert command[command.index("--device") + 1] == "cuda"
        assert command[command.index("--sizes") + 1].split(",")[0] == "1e8"  # goals first
    assert steps["selftest"].command[2:] == [
        "dsd_kernels.selftest", "--device", "cuda", "--json", str(tmp_path / "out/selftest.json")]


def test_the_semi_structured_step_runs_on_cuda_and_is_skipped_in_a_rehearsal(tmp_path, capsys):
    for device, skip in (("cuda", None), ("cpu", "torch's semi-structured kernels run on CUDA "
                                                  "only")):
        step = next(s for s in gpu_check.plan(device, tmp_path / "out", tmp_path / "work")
                    if s.name == "bench-semi-structured")
        assert step.skip == skip and step.command[1] == "bench/bench_semi_structured.py"
        assert step.command[step.command.index("--device") + 1] == device
    out = tmp_path / "out"
    out.mkdir()
    (out / "semi_structured.json").write_text("[]")  # an earlier run's
    run = gpu_check.run_steps([gpu_check.Step("never", _python("raise SystemExit(3)"), 5,
                                              fresh=(out / "semi_structured.json",),
                                              skip="no such device")],
                              "cpu", out, tmp_path / "work")
    assert [(s["name"], s["status"], s["reason"]) for s in run.summary["steps"]] == [
        ("never", "skipped", "no such device")]
    assert "never: skipped: no such device" in (out / "log.txt").read_text()
    assert not (out / "semi_structured.json").exists()
    assert "never                  skipped: no such device" in capsys.readouterr().out


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "budgets 500 s in all" in printed
    for step in gpu_check.plan("cuda", tmp_path, tmp_path):
        assert f". {step.name} (" in printed
    assert not (tmp_path / "out").exists()


def test_only_and_budget_overrides(tmp_path, capsys):
    gpu_check.main(["--dry-run", "--only", "selftest,bench-mask", "--budget", "selftest=7"])
    printed = capsys.readouterr().out
    assert "2 steps, budgets 52 s in all" in printed
    for bad in (["--only", "nope"], ["--budget", "selftest=x"], ["--budget", "nope=3"]):
        with pytest.raises(SystemExit) as exit_:
            gpu_check.main(["--dry-run", *bad])
        assert exit_.value.code == 2


def _rows(impl_seconds, numel=100, **extra):
    return [dict(numel=numel, case=f"{numel}", impl=impl, seconds=seconds, **extra)
            for impl, seconds in impl_seconds.items()]


def test_goals_are_judged_from_the_same_runs_rows():
    optim = _rows({"dsd MaskedAdamW": 1.0, "torch AdamW fused + mask p, state (mul_)": 2.5,
                   "torch AdamW fused + mask p, state (masked_fill_)": 9.0},
                  pct_copy=90.0, copy_gbps=3000.0)
    threshold = [dict(numel=100, case="100", impl="dsd global", seconds=1.0, x_one_read=1.6)]
    overhead = [dict(case="resnet50 (161 tensors)", impl="dsd MaskedAdamW (real step, host time)",
                     seconds=1.0, x_torch=0.5)]
    goals = {g["goal"]: g for g in judge({"optim.json": optim, "threshold.json": threshold,
                                          "step_overhead.json": overhead}, 100)}
    assert goals["masked AdamW step / copy bandwidth"]["status"] == "pass"
    speedup = goals["masked AdamW step vs fused AdamW + masking"]
    assert speedup["value"] == 2.5 and speedup["status"] == "pass"  # the faster masking
    assert goals["threshold / one read"]["status"] == "fail"
    assert goals["masks, global / one read"]["status"] == "not measured"
    assert goals["host work per ResNet-50 step / torch fused AdamW's"]["status"] == "pass"
    # Rows of another size are not the goal's case.
    assert all(g["status"] == "not measured" for g in judge({"optim.json": optim}, 10**8))


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.slow  # runs processes and waits for a time limit
def test_a_step_over_its_budget_is_stopped_and_the_next_runs(tmp_path):
    steps = [gpu_check.Step("sleeper", _python("import time; time.sleep(60)"), 1.0),
             gpu_check.Step("after", _python("print('the next step ran')"), 60.0)]
    start = time.monotonic()
    run = gpu_check.run_steps(steps, "cpu", tmp_path / "out", tmp_path / "work")
    assert time.monotonic() - start < 30
    assert [(s["name"], s["status"]) for s in run.summary["steps"]] == [
        ("sleeper", "timed out"), ("after", "passed")]
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert saved["steps"] == run.summary["steps"]
    assert "the next step ran" in (tmp_path / "out/log.txt").read_text()
    # A rerun of one step keeps the others' records; a whole run starts afresh.
    rerun = gpu_check.run_steps(steps[:1], "cpu", tmp_path / "out", tmp_path / "work", rerun=True)
    assert [s["name"] for s in rerun.summary["steps"]] == ["sleeper", "after"]
    assert rerun.summary["steps"][1] == run.summary["steps"][1]
    fresh = gpu_check.run_steps(steps[1:], "cpu", tmp_path / "out", tmp_path / "work")
    assert [s["name"] for s in fresh.summary["steps"]] == ["after"]


@pytest.mark.slow  # kills a process
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_what_was_written_before_an_interruption_survives(tmp_path, stop):
    out = tmp_path / "out"
    writer = _python(f"open({str(out / 'mask.json')!r}, 'w').write('[]')")
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import gpu_check; "
              f"from pathlib import Path; gpu_check.run_steps(["
              f"gpu_check.Step('writer', {writer!r}, 60), "
              f"gpu_check.Step('sleeper', {_python('import time; time.sleep(120)')!r}, 120)], "
              f"'cpu', Path({str(out)!r}), Path({str(tmp_path / 'work')!r}))")
    proc = subprocess.Popen(_python(script), cwd=ROOT)
    summary, sleeper = out / "summary.json", None
    try:
        deadline = time.monotonic() + 120
        while sleeper is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if summary.exists():
                steps = json.loads(summary.read_text())["steps"]
                sleeper = next((s for s in steps if s["name"] == "sleeper"
                                and s["status"] == "running"), None)
        assert sleeper is not None, "the second step never started"
        proc.send_signal(stop)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        if sleeper is not None and stop == signal.SIGKILL:  # its child outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sleeper["pid"], signal.SIGKILL)
    steps = {s["name"]: s for s in json.loads(summary.read_text())["steps"]}
    assert steps["writer"]["status"] == "passed"
    assert (out / "mask.json").read_text() == "[]"
    expected = "running" if stop == signal.SIGKILL else "interrupted"
    assert steps["sleeper"]["status"] == expected


def test_a_signal_while_the_running_record_is_saved_still_stops_the_step(tmp_path, monkeypatch):
    save = gpu_check.Run.save

    def interrupted_save(run):  # SIGTERM lands as the step's "running" record is written
        save(run)
        if any(s.get("status") == "running" for s in run.summary["steps"]):
            raise gpu_check.Interrupted("SIGTERM")

    monkeypatch.setattr(gpu_check.Run, "save", interrupted_save)
    steps = [gpu_check.Step("sleeper", _python("import time; time.sleep(120)"), 120)]
    began = time.monotonic()
    run = gpu_check.run_steps(steps, "cpu", tmp_path / "out", tmp_path / "work")
    assert time.monotonic() - began < 60  # the sleeper was killed, not waited for
    assert run.summary["steps"][0]["status"] == "interrupted"


def test_test_counts_from_junit_or_from_the_log_of_a_stopped_run(tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0" '
                     'time="1.5"><testcase classname="tests.test_mask" name="test_a"/>'
                     '<testcase classname="tests.test_mask" name="test_b">'
                     '<failure message="assert 1 == 2&#10;more">trace</failure></testcase>'
                     '</testsuite></testsuites>')
    counts = gpu_check._tests(junit, "")
    assert counts["tests"] == 2 and counts["failures"] == 1
    assert counts["failed"] == ["tests.test_mask::test_b (failure): assert 1 == 2"]
    log = ("tests/test_mask.py::test_a[radix only-cuda] PASSED    [ 10%]\n"
           "tests/test_mask.py::test_b[cuda] FAILED    [ 20%]\n"
           "tests/test_mask.py::test_c[cuda] ")  # stopped mid-case
    counts = gpu_check._tests(tmp_path / "none.xml", log)
    assert counts["outcomes"] == {"PASSED": 1, "FAILED": 1}
    assert counts["failed"] == ["tests/test_mask.py::test_b[cuda] (failed)"]


def test_the_semi_structured_bench_without_a_gpu(monkeypatch, capsys):
    """Its rows from a stand-in conversion (the kernels need CUDA), and its one-line skip."""
    bench = bench_semi_structured
    monkeypatch.setattr(bench, "to_semi_structured_",
                        lambda model: SemiStructuredReport(["weight"], {}))
    args = argparse.Namespace(device="cpu", tokens=8, min_time=0.0)
    rows = bench.measure("small", 16, 32, args, {"device": "cpu"})
    assert [(r["case"], r["impl"]) for r in rows] == [("small", "dense"),
                                                      ("small", "2:4 semi-structured")]
    assert rows[1]["max_abs_diff"] == 0 and rows[1]["speedup"] > 0
    assert bench.main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(
        "skipped: torch's semi-structured kernels run on CUDA only")
