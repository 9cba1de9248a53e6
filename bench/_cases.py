"""What the bench scripts share besides timing: the command line, the sizes, the rows.

A size is a number of elements in one tensor ("16e6"), "resnet50": the 161 parameter tensors
of torchvision's ResNet-50 (25.6M elements), or "gpt2": GPT-2 small's 148 (124M elements), the
"many small tensors" cases. Every row of a run carries the environment (_timing.environment),
the measured copy bandwidth, `x_dsd`: the row's time over the time of the dsd row it is
compared with, `x_read`: over the time of one streaming pass over the same tensors (|x| into
preallocated buffers: a read and a write), and `x_one_read`: over the time of reading them
once (torch.amax of each, nothing written), where the script measures them. Rows are written
after each measurement, so a run stopped early keeps what it measured.
"""

import argparse
import math
import os
from pathlib import Path

import torch

import dsd_kernels as dk

from _timing import (
    copy_bandwidth,
    environment,
    first_call_seconds,
    median_seconds,
    print_table,
    write_rows,
)

DEFAULT_SIZES = {"cpu": "1e5,1e6,16e6,resnet50", "cuda": "1e5,1e6,1e7,1e8,1e9,resnet50"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMNS = ["case", "impl", "first ms", "ms", "GB/s", "%copy", "x_dsd", "x_read", "x_one_read"]


def parser(description: str, op: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=dk.BACKEND_CHOICES, default="auto",
                   help="dsd_kernels backend for the dsd rows (default: auto)")
    p.add_argument("--sizes", help="comma-separated element counts and/or 'resnet50' "
                   f"(default: {DEFAULT_SIZES['cpu']} on cpu, {DEFAULT_SIZES['cuda']} on cuda)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every row (CPU)")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds each measurement runs at least (CPU)")
    p.add_argument("--out", help=f"JSON rows (default: bench/results/<device>_{op}.json)")
    return p


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision ResNet-50's parameter shapes, in named_parameters() order."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Hugging Face GPT-2 small's parameter shapes (Conv1D weights are in x out), in
    named_parameters() order."""
    d = 768
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    return [(50257, d), (1024, d)] + block * 12 + [(d,), (d,)]


_SHAPE_LISTS = {"resnet50": resnet50_shapes, "gpt2": gpt2_small_shapes}


def cases(args) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(label, shapes) for each requested size."""
    out = []
    for size in (args.sizes or DEFAULT_SIZES[args.device]).split(","):
        if size in _SHAPE_LISTS:
            shapes = _SHAPE_LISTS[size]()
            out.append((f"{size} ({len(shapes)} tensors)", shapes))
        else:
            out.append((size, [(int(float(size)),)]))
    return out


def make(shapes, args, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=args.device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=args.device, dtype=DTYPES[args.dtype])
            for shape in shapes]


class Run:
    """Times the impls of one script, case after case, and collects the rows."""

    def __init__(self, args, op: str):
        self.args, self.op = args, op
        if args.threads:
            torch.set_num_threads(args.threads)
        dk.use_backend(args.backend)
        self.env = environment(args.device)
        self.env["dsd_backend"] = dk.selected_backends()[args.device]
        self.copy_gbps = copy_bandwidth(args.device)
        print(f"{op}: {self.env['device_name']}, {self.env['cpu_threads']} threads, "
              f"dsd backend {self.env['dsd_backend']}, copy bandwidth {self.copy_gbps:.1f} GB/s")
        self.path = Path(args.out or Path(__file__).parent / "results" /
                         f"{args.device}_{op}.json")
        self.rows: list[dict] = []
        self.reads: dict[str, float] = {}  # case: seconds of one streaming pass
        self.one_reads: dict[str, float] = {}  # case: seconds of reading the tensors once

    def streaming_read(self, case: str, xs) -> None:
        """Time one streaming pass over the case's tensors (|x| into preallocated buffers),
        which `x_read` divides by, and one read of them (torch.amax of each), which
        `x_one_read` divides by: the least any pass over the weights costs."""
        buffers = [torch.empty_like(x) for x in xs]
        self.reads[case] = median_seconds(
            lambda: [torch.abs(x, out=b) for x, b in zip(xs, buffers)], self.args.device,
            min_time=self.args.min_time)
        self.one_reads[case] = median_seconds(lambda: [torch.amax(x) for x in xs],
                                              self.args.device, min_time=self.args.min_time)
        print(f"  {case:>22}  {'one streaming pass (abs into a buffer)':<44} "
              f"{_ms(self.reads[case])} ms", flush=True)
        print(f"  {case:>22}  {'one read (amax)':<44} {_ms(self.one_reads[case])} ms",
              flush=True)

    def time(self, case: str, numel: int, impl: str, fn, nbytes: int, reference: str) -> None:
        """One row: `fn`'s median time; `nbytes` is what the task must move at the least;
        `reference` names the dsd impl of the same case that x_dsd divides by."""
        try:
            first = first_call_seconds(fn, self.args.device)
            seconds = median_seconds(fn, self.args.device, min_time=self.args.min_time)
        except torch.OutOfMemoryError:
            first = seconds = None
            torch.cuda.empty_cache()
        gbps = nbytes / seconds / 1e9 if seconds else None
        row = dict(self.env, op=self.op, case=case, numel=numel, dtype=self.args.dtype,
                   sparsity=self.args.sparsity, impl=impl, reference=reference,
                   first_call_seconds=first, seconds=seconds, bytes=nbytes, gbps=gbps,
                   copy_gbps=self.copy_gbps,
                   pct_copy=100 * gbps / self.copy_gbps if gbps else None,
                   load_avg_1min=os.getloadavg()[0], error=None if seconds else "out of memory")
        ref = next((r for r in self.rows if r["case"] == case and r["impl"] == reference), row)
        row["x_dsd"] = seconds / ref["seconds"] if seconds and ref["seconds"] else None
        row["x_read"] = seconds / self.reads[case] if seconds and case in self.reads else None
        row["x_one_read"] = (seconds / self.one_reads[case]
                             if seconds and case in self.one_reads else None)
        self.rows.append(row)
        write_rows(self.path, self.rows)
        print(f"  {case:>22}  {impl:<44} {_ms(seconds)} ms (first call {_ms(first)} ms)",
              flush=True)

    def finish(self) -> None:
        print_table([{"case": r["case"], "impl": r["impl"],
                      "first ms": _ms(r["first_call_seconds"]), "ms": _ms(r["seconds"]),
                      "GB/s": r["gbps"], "%copy": r["pct_copy"], "x_dsd": r["x_dsd"],
                      "x_read": r["x_read"], "x_one_read": r["x_one_read"]}
                     for r in self.rows], COLUMNS)
        print(f"rows written to {self.path}")


def pruned_count(sparsity: float, numel: int) -> int:
    return math.floor(sparsity * numel)


def _ms(seconds):
    return None if seconds is None else f"{seconds * 1e3:.3f}"
