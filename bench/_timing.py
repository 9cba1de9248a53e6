"""The one timing helper every bench script shares.

Medians, not means; on CUDA `triton.testing.do_bench` (which flushes L2 and syncs), on CPU a
wall-clock loop. A row's first call is timed apart (`first_call_seconds`): it pays for
whatever the process has not compiled yet. Every row a script writes carries the device, the
versions and the commit, so a JSON file under bench/results/ says where its numbers came from.

    python bench/_timing.py --device cuda --out env.json   # the environment record alone
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy
import torch

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, device: str, *, min_time: float = 0.5, min_reps: int = 5) -> float:
    """Median wall time of fn() in seconds, after one warm-up call."""
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_time * 1e3)),
                                       return_mode="median") / 1e3
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_call_seconds(fn, device: str) -> float:
    """Wall time of one call of fn, synchronised on CUDA: the first call in a process includes
    the compile of every kernel variant it is the first to launch."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def copy_bandwidth(device: str, numel: int = 1 << 26) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second)."""
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * src.nbytes / seconds / 1e9


def commit() -> str:
    """The checkout's commit; without git or a .git folder (a copied tree), the COMMIT file
    at the repository root if there is one, else "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT).stdout.strip()
    except OSError:
        head = ""
    if head:
        return head
    recorded = ROOT / "COMMIT"
    return (recorded.read_text().strip() if recorded.is_file() else "") or "unknown"


def environment(device: str) -> dict:
    """Where the numbers come from: device, versions, commit."""
    record = {"device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        record.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                      device_memory_gb=round(props.total_memory / 1e9, 1),
                      cuda=torch.version.cuda)
    else:
        record["device_name"] = platform.processor() or platform.machine()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record.update(cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                  triton=triton_version, python=platform.python_version(),
                  numpy=numpy.__version__, commit=commit(), date=time.strftime("%Y-%m-%d"))
    return record


def write_rows(path: str | os.PathLike, rows) -> None:
    """Replace the JSON file at once (written beside it, then renamed), so a run stopped at
    any moment leaves the last complete version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(partial, path)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table of the chosen columns."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the environment record as JSON.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", help="JSON file (default: standard output)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible")
    record = json.dumps(environment(args.device), indent=1)
    print(record)
    if args.out:
        Path(args.out).write_text(record + "\n")


if __name__ == "__main__":
    main()
