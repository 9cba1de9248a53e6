"""The goals, judged from the rows the bench scripts wrote in the same run.

Each goal is a ratio of two measurements of one run ([docs/gpu.md](../docs/gpu.md), "The
goals", says what each compares; [docs/benchmarks.md](../docs/benchmarks.md), "Every
optimizer", the masked steps'): nothing here depends on a device's nominal speeds. A goal
whose rows are missing (a step that failed or ran out of time) is "not measured", never a pass.
"""

from collections.abc import Callable
from dataclasses import dataclass

DSD_ADAMW = "dsd MaskedAdamW"
# Torch's two ways of masking after its fused step; the goal compares with the faster.
TORCH_ADAMW_MASKED = ("torch AdamW fused + mask p, state (mul_)",
                      "torch AdamW fused + mask p, state (masked_fill_)")
# On a GPU the real steps' host time; a CPU rehearsal has only the stubbed launches.
HOST_ROWS = ("dsd MaskedAdamW (real step, host time)", "dsd MaskedAdamW, cached, same grads")
# A masked step's time over the same optimizer's unmasked step (bench_optim.py's x_unmasked),
# per path of dsd's masked step: the fused kernels (SGD, Adam, AdamW) against torch's fused
# step, the general path (the other element-wise optimizers) against the optimizer's own
# foreach step.
MASKED_STEP_LIMITS = {"fused": 1.1, "general": 1.3}
# bench_mask.py's N:M rows: dsd's 2:4 masks and the torch ops users write for them.
DSD_NM = "dsd nm_masks 2:4"
TORCH_NM_TOPK = "torch reshape + topk + scatter"


def _row(rows, numel, impl):
    return next((r for r in rows if r.get("numel") == numel and r.get("impl") == impl
                 and r.get("seconds")), None)


def _share_of_copy(rows, numel):
    row = _row(rows, numel, DSD_ADAMW)
    return (row["pct_copy"] / 100, f"copy {row['copy_gbps']:.0f} GB/s") if row else (None, "")


def _speedup_over_torch_masking(rows, numel):
    dsd = _row(rows, numel, DSD_ADAMW)
    torch_rows = [r for r in (_row(rows, numel, impl) for impl in TORCH_ADAMW_MASKED) if r]
    if not dsd or not torch_rows:
        return None, ""
    fastest = min(torch_rows, key=lambda r: r["seconds"])
    return fastest["seconds"] / dsd["seconds"], f"against {fastest['impl']}"


def _over_one_read(impl):
    def measure(rows, numel):
        row = _row(rows, numel, impl)
        return (row["x_one_read"] if row else None), impl
    return measure


def _speedup_over(impl, reference):
    def measure(rows, numel):
        dsd, other = _row(rows, numel, impl), _row(rows, numel, reference)
        ratio = other["seconds"] / dsd["seconds"] if dsd and other else None
        return ratio, f"against {reference}"
    return measure


def _slowest_masked_step(path):
    def measure(rows, numel):
        dsd = [r for r in rows if r.get("numel") == numel and r.get("path") == path
               and r.get("impl") == f"dsd Masked{r.get('optimizer')}" and r.get("x_unmasked")]
        if not dsd:
            return None, ""
        slowest = max(dsd, key=lambda r: r["x_unmasked"])
        return slowest["x_unmasked"], f"slowest of {len(dsd)}: {slowest['optimizer']}"
    return measure


def _host_work(rows, numel):
    row = next((r for impl in HOST_ROWS for r in rows
                if r.get("case", "").startswith("resnet50") and r.get("impl") == impl), None)
    return (row["x_torch"], f"resnet50, {row['impl']}") if row else (None, "resnet50")


@dataclass(frozen=True)
class Goal:
    name: str
    file: str  # the bench JSON in the run's output folder
    limit: float
    at_least: bool  # the ratio must be >= limit (else <= limit)
    unit: str
    measure: Callable  # (rows, numel) -> (ratio or None, what it was measured on)


GOALS = (
    Goal("masked AdamW step / copy bandwidth", "optim.json", 0.85, True, "of copy",
         _share_of_copy),
    Goal("masked AdamW step vs fused AdamW + masking", "optim.json", 2.0, True, "x faster",
         _speedup_over_torch_masking),
    Goal("masked fused steps / torch's fused unmasked step", "optim.json",
         MASKED_STEP_LIMITS["fused"], False, "x unmasked", _slowest_masked_step("fused")),
    Goal("masked general steps / the optimizer's foreach unmasked step", "optim.json",
         MASKED_STEP_LIMITS["general"], False, "x unmasked", _slowest_masked_step("general")),
    Goal("threshold / one read", "threshold.json", 1.5, False, "x one read",
         _over_one_read("dsd global")),
    Goal("masks, global / one read", "mask.json", 2.5, False, "x one read",
         _over_one_read("dsd masks global")),
    Goal("masks, per layer / one read", "mask.json", 2.5, False, "x one read",
         _over_one_read("dsd masks layer")),
    Goal("N:M masks (2:4) / one read", "mask.json", 1.5, False, "x one read",
         _over_one_read(DSD_NM)),
    Goal("N:M masks (2:4) vs torch reshape + topk + scatter", "mask.json", 10.0, True,
         "x faster", _speedup_over(DSD_NM, TORCH_NM_TOPK)),
    Goal("host work per ResNet-50 step / torch fused AdamW's", "step_overhead.json", 1.0,
         False, "x torch's", _host_work),
)


def judge(rows_by_file: dict[str, list[dict]], numel: int) -> list[dict]:
    """Every goal at `numel` elements: its ratio, the limit, and "pass", "fail" or
    "not measured"."""
    results = []
    for goal in GOALS:
        value, measured_on = goal.measure(rows_by_file.get(goal.file, []), numel)
        if value is None:
            status = "not measured"
        elif value >= goal.limit if goal.at_least else value <= goal.limit:
            status = "pass"
        else:
            status = "fail"
        results.append({"goal": goal.name, "value": value,
                        "limit": f"{'>=' if goal.at_least else '<='} {goal.limit:g}",
                        "unit": goal.unit, "numel": numel, "measured_on": measured_on,
                        "status": status})
    return results


def first_calls(rows_by_file: dict[str, list[dict]]) -> list[dict]:
    """dsd's rows with their first call (compile included) beside their steady-state time."""
    return [{"file": name, "case": r["case"], "impl": r["impl"],
             "first_call_ms": r["first_call_seconds"] * 1e3, "steady_ms": r["seconds"] * 1e3}
            for name, rows in rows_by_file.items() for r in rows
            if r.get("impl", "").startswith("dsd") and r.get("first_call_seconds")
            and r.get("seconds")]
