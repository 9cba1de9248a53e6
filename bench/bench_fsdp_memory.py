"""Memory and time per rank of sparse training under FSDP2 (gloo processes on this machine):
a Llama from `transformers` (random init) trained on the embedded text with torch's
`fully_shard` in a plain loop, once with DSD and dsd's MaskedAdamW (50% of every prunable
weight masked, per layer) and once with torch's AdamW, unmasked.

    python bench/bench_fsdp_memory.py --worlds 2,4

Per rank: the bytes of the masks and of the optimizer's state (exact: the local shards'
storage), of the parameters and gradients; the peak resident memory while training above what
the rank held before its first step, after one forward and backward pass whose gradients were
dropped (VmHWM less VmRSS, with malloc set to map and unmap every allocation of 64 KiB or more:
gradients, optimizer state, masks, FSDP2's gathered layers, activations; the kernel's count of
resident pages, not an exact accounting of tensors); and, from a second run with the default
allocator, the median time of a training step (forward, backward, optimizer step) and of the
optimizer step alone.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _memory import reset_peak, resident  # noqa: E402
from _timing import environment, print_table, write_rows  # noqa: E402

# For the memory runs: every allocation of 64 KiB or more mapped on its own and unmapped when
# freed, in one arena, so that resident memory follows the live tensors rather than malloc's
# caches (which made ranks holding the same tensors differ by 100 MiB). Each allocation is
# then a system call, so the times come from a second run with the default allocator.
MEMORY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
MODES = ("dsd MaskedAdamW, 50% masked", "torch AdamW, unmasked")


def _local_bytes(tensors) -> int:
    import dsd_kernels as dk

    return sum(dk.local_tensor(t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def _worker(rank, world, init, mode, args, queue):
    from torch.distributed.fsdp import fully_shard

    import dsd_kernels as dk
    from dsd import DSD, Plan
    from dsd.data import load_task
    from dsd.integrations.llama import tiny_llama

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    dk.use_backend(args.backend)
    data = load_task("text", seq_len=args.seq_len)
    torch.manual_seed(0)  # every rank builds the same model before sharding it
    model = tiny_llama(data.num_classes, hidden_size=args.hidden, num_layers=args.layers,
                       intermediate_size=args.intermediate, num_heads=args.heads,
                       max_positions=args.seq_len)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    steps = args.warmup + args.steps
    if mode == MODES[0]:
        optimizer = dk.MaskedAdamW(model.parameters(), lr=1e-3)
        dsd = DSD(model, optimizer, Plan.from_lengths([steps], sparsity=0.5, unit="steps",
                                                      first="sparse"))
    else:
        optimizer, dsd = torch.optim.AdamW(model.parameters(), lr=1e-3), None
    batch = args.batch * world  # the global batch; each rank takes its share
    # One forward and backward first, its gradients dropped: what a first pass loads once
    # (lazy imports, thread pools) stays out of the peak measured below.
    torch.nn.functional.cross_entropy(model(data.x_train[:args.batch]).flatten(0, 1),
                                      data.y_train[:args.batch].flatten()).backward()
    optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    before = resident("VmRSS")
    reset_peak()
    step_seconds, optimizer_seconds = [], []
    for step in range(steps):
        x = data.x_train[step * batch:(step + 1) * batch][rank::world]
        y = data.y_train[step * batch:(step + 1) * batch][rank::world]
        began = time.perf_counter()
        if dsd is not None:
            dsd.step_start(step)
        optimizer.zero_grad()
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        stepped = time.perf_counter()
        optimizer.step()
        done = time.perf_counter()
        if step >= args.warmup:
            step_seconds.append(done - began)
            optimizer_seconds.append(done - stepped)
    peak = resident("VmHWM") - before
    masks = optimizer.masks if dsd is not None else {}
    state = [t for per_param in optimizer.state.values() for t in per_param.values()]
    queue.put({
        "rank": rank, "mask_bytes": _local_bytes(masks.values()),
        "state_bytes": _local_bytes(state), "param_bytes": _local_bytes(model.parameters()),
        "grad_bytes": _local_bytes(p.grad for p in model.parameters()),
        "peak_rss_bytes": peak, "rss_before_bytes": before,
        "step_ms": 1e3 * statistics.median(step_seconds),
        "optimizer_ms": 1e3 * statistics.median(optimizer_seconds),
        "zeros_kept": dsd is None or all(
            not dk.local_tensor(p.detach())[~m].any() for p, m in masks.items()),
        "parameters": sum(p.numel() for p in model.parameters())})
    dist.barrier()  # no rank tears gloo down while a peer's last collective is in flight
    dist.destroy_process_group()
    queue.close()
    queue.join_thread()
    # FSDP2 keeps its group alive past destroy_process_group; releasing gloo's threads during
    # interpreter finalization can abort the process, so a finished rank skips it.
    sys.stdout.flush()
    os._exit(0)


def _spawn(world: int, mode: str, args, malloc: dict) -> list[dict]:
    """Each rank's measurements of one run, its processes started with `malloc` in their
    environment."""
    saved = {key: os.environ.get(key) for key in MEMORY_MALLOC}
    os.environ.update(malloc)
    try:
        queue = mp.get_context("spawn").Queue()
        with tempfile.TemporaryDirectory() as scratch:
            mp.spawn(_worker, args=(world, os.path.join(scratch, "init"), mode, args, queue),
                     nprocs=world, join=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
    if not all(r["zeros_kept"] for r in ranks):
        sys.exit(f"{mode} on {world} ranks: a masked weight is not zero")
    return ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--backend", choices=["torch", "cpp"], default="cpp")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "cpu_fsdp_memory.json"))
    args = parser.parse_args()
    rows = []
    for world in map(int, args.worlds.split(",")):
        for mode in MODES:
            ranks = _spawn(world, mode, args, MEMORY_MALLOC)
            timed = _spawn(world, mode, args, {})
            for r, t in zip(ranks, timed):
                rows.append({
                    "mode": mode, "world": world, "rank": r["rank"],
                    "parameters": r["parameters"],
                    "mask MiB": round(r["mask_bytes"] / 2**20, 2),
                    "optimizer state MiB": round(r["state_bytes"] / 2**20, 2),
                    "parameter MiB": round(r["param_bytes"] / 2**20, 2),
                    "gradient MiB": round(r["grad_bytes"] / 2**20, 2),
                    "peak RSS over model MiB": round(r["peak_rss_bytes"] / 2**20, 1),
                    "RSS before MiB": round(r["rss_before_bytes"] / 2**20, 1),
                    "step ms": round(t["step_ms"], 1),
                    "optimizer step ms": round(t["optimizer_ms"], 2),
                    "backend": args.backend, "threads": args.threads,
                    "shape": {"hidden": args.hidden, "intermediate": args.intermediate,
                              "layers": args.layers, "heads": args.heads,
                              "seq_len": args.seq_len, "batch_per_rank": args.batch},
                    **environment("cpu")})
    print_table(rows, ["mode", "world", "rank", "mask MiB", "optimizer state MiB",
                       "parameter MiB", "gradient MiB", "peak RSS over model MiB", "step ms",
                       "optimizer step ms"])
    write_rows(args.out, rows)
    print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
