"""The sharded threshold and masks (gloo processes on this machine): collectives, bytes sent,
peak extra memory per rank and time, per call of dsd_kernels.magnitude_masks.

    python bench/bench_sharded.py --worlds 2,4 --backend cpp

Cases: ResNet-50's 161 tensors per layer and globally (25.6M fp32 weights split over the
ranks), and one tensor of 16M (fp32, bf16) or 64M (fp32) elements. Each rank holds a dim-0
shard. "extra
MiB" is the rank's peak resident memory during the call above what it held before, less the
masks it returns (one byte per element): what the call costs beyond its result.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _cases import resnet50_shapes  # noqa: E402
from _memory import reset_peak, resident  # noqa: E402
from _timing import environment, print_table, write_rows  # noqa: E402

CASES = {  # name: (shapes, dtype, scope)
    "resnet50 layer": (resnet50_shapes(), torch.float32, "layer"),
    "resnet50 global": (resnet50_shapes(), torch.float32, "global"),
    "16M fp32": ([(1 << 24,)], torch.float32, "layer"),
    "64M fp32": ([(1 << 26,)], torch.float32, "layer"),
    "16M bf16": ([(1 << 24,)], torch.bfloat16, "layer"),
}


def _count_collectives(calls):
    """Wrap the collectives the sharded path uses, recording (name, bytes this rank sends)."""
    def wrap(name, real):
        def collective(first, *args, **kwargs):
            calls.append((name, (args[0] if name == "all_gather" else first).nbytes))
            return real(first, *args, **kwargs)
        return collective
    for name in ("all_reduce", "all_gather"):
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _worker(rank, world, init, case, backend, threads, queue):
    import dsd_kernels as dk

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    dk.use_backend(backend)
    shapes, dtype, scope = CASES[case]
    gen = torch.Generator().manual_seed(0)
    shards = []
    for shape in shapes:  # filled in slices: no temporary larger than a slice
        lo, hi = rank * shape[0] // world, (rank + 1) * shape[0] // world
        shard = torch.empty((hi - lo, *shape[1:]), dtype=dtype)
        flat = shard.view(-1)
        for start in range(0, flat.numel(), 1 << 20):
            flat[start:start + (1 << 20)] = torch.randn(min(1 << 20, flat.numel() - start),
                                                        generator=gen)
        shards.append(shard)
    # Warm-up on a small copy (libraries, thread pools), then the measured call.
    dk.magnitude_masks([s[:1] for s in shards], 0.5, scope, process_group=dist.group.WORLD)
    calls = []
    _count_collectives(calls)
    dist.barrier()
    reset_peak()
    before = resident("VmRSS")
    began = time.perf_counter()
    masks = dk.magnitude_masks(shards, 0.5, scope, process_group=dist.group.WORLD)
    seconds = time.perf_counter() - began
    extra = max(0, resident("VmHWM") - before - sum(m.numel() for m in masks))
    elements = sum(s.numel() for s in shards)
    queue.put({"rank": rank, "seconds": seconds, "extra_bytes": extra, "elements": elements,
               "collectives": len(calls), "bytes_sent": sum(b for _, b in calls)})
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--backend", choices=["torch", "cpp"], default="cpp")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "cpu_sharded.json"))
    args = parser.parse_args()
    rows = []
    context = mp.get_context("spawn")
    for world in map(int, args.worlds.split(",")):
        for case in args.cases.split(","):
            queue = context.Queue()
            with tempfile.TemporaryDirectory() as scratch:
                mp.spawn(_worker, args=(world, os.path.join(scratch, "init"), case,
                                        args.backend, args.threads, queue),
                         nprocs=world, join=True)
            ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
            worst = max(ranks, key=lambda r: r["extra_bytes"] / max(r["elements"], 1))
            rows.append({
                "case": case, "world": world, "backend": args.backend,
                "ms": round(1e3 * max(r["seconds"] for r in ranks), 2),
                "collectives": ranks[0]["collectives"],
                "KB sent/rank": round(max(r["bytes_sent"] for r in ranks) / 1e3, 1),
                "extra MiB/rank": round(worst["extra_bytes"] / 2**20, 1),
                "extra B/element": round(worst["extra_bytes"] / max(worst["elements"], 1), 3),
                "elements/rank": worst["elements"], **environment("cpu")})
    print_table(rows, ["case", "world", "ms", "collectives", "KB sent/rank", "extra MiB/rank",
                       "extra B/element"])
    write_rows(args.out, rows)
    print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
