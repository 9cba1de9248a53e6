"""The one timing helper every bench script shares.

Medians, not means; on CUDA `triton.testing.do_bench` (which flushes L2 and syncs), on CPU a
wall-clock loop. Every row a script writes carries the device, the versions and the commit,
so a JSON file under bench/results/ says where its numbers came from.
"""

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


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


def copy_bandwidth(device: str, numel: int = 1 << 26) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second)."""
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * src.nbytes / seconds / 1e9


def environment(device: str) -> dict:
    """Where the numbers come from: device name, versions, commit."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip() or None
    return {
        "device": device,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


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
