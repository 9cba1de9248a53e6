"""Global magnitude pruning of a whole model: dsd_kernels.prune.global_unstructured against
torch.nn.utils.prune.global_unstructured (L1Unstructured), measured in the same run.

    python bench/bench_prune.py                 # bert-base and resnet50, amounts 0.5 and 0.9

Models are their parameter shapes only (random weights): BERT-base (the 2-D weights of its
embeddings, attention, feed-forward and pooler: 109.4M entries in 76 tensors) and ResNet-50
(its conv and fc weights: 25.5M in 54 tensors). Each call runs in a fresh process, which
builds the modules, loads the kernels, resets its peak-memory mark (/proc/self/clear_refs) and
prunes once: "peak extra MB" is the peak resident memory during the call above the memory
before it, "kept MB" what is still held after it (the masks, the pruned copies and anything the
hooks keep). The median of --repeats processes is reported.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from _timing import environment, print_table, write_rows


def bert_base_shapes() -> list[tuple[int, ...]]:
    hidden, ffn = 768, 3072
    shapes = [(30522, hidden), (512, hidden), (2, hidden)]
    for _ in range(12):
        shapes += [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]
    return shapes + [(hidden, hidden)]


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from _cases import resnet50_shapes

    return [shape for shape in resnet50_shapes() if len(shape) >= 2]


MODELS = {"bert-base": bert_base_shapes, "resnet50": resnet50_weight_shapes}
IMPLS = ("dsd", "torch")


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Holder(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


def child(model: str, amount: float, impl: str) -> dict:
    """One pruning call in this process: seconds, peak extra and kept memory (MB)."""
    from torch.nn.utils import prune as torch_prune

    import dsd_kernels as dk
    from dsd_kernels import prune as dk_prune

    gen = torch.Generator().manual_seed(0)
    modules = [_Holder(torch.randn(shape, generator=gen)) for shape in MODELS[model]()]
    dk.magnitude_masks(torch.randn(1000), 0.5)  # load the kernels outside the measurement
    pairs = [(m, "weight") for m in modules]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    before = _memory_kb("VmRSS")
    start = time.perf_counter()
    if impl == "dsd":
        dk_prune.global_unstructured(pairs, amount=amount)
    else:
        torch_prune.global_unstructured(pairs, pruning_method=torch_prune.L1Unstructured,
                                        amount=amount)
    seconds = time.perf_counter() - start
    peak, after = _memory_kb("VmHWM"), _memory_kb("VmRSS")
    pruned = sum(int((m.weight_mask == 0).sum()) for m in modules)
    return {"seconds": seconds, "peak_extra_mb": (peak - before) / 1024,
            "kept_mb": (after - before) / 1024, "pruned": pruned,
            "numel": sum(m.weight_orig.numel() for m in modules), "tensors": len(modules)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--amounts", default="0.5,0.9")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_prune.json"))
    p.add_argument("--child", nargs=3, metavar=("MODEL", "AMOUNT", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model, amount, impl = args.child
        print(json.dumps(child(model, float(amount), impl)))
        return
    env = environment("cpu")
    rows = []
    for model in args.models.split(","):
        for amount in (float(a) for a in args.amounts.split(",")):
            for impl in IMPLS:
                runs = [json.loads(subprocess.run(
                    [sys.executable, __file__, "--child", model, str(amount), impl],
                    check=True, capture_output=True, text=True).stdout)
                    for _ in range(args.repeats)]
                row = dict(env, op="prune", case=f"{model} {amount:g}", model=model,
                           amount=amount, impl=impl, repeats=args.repeats,
                           numel=runs[0]["numel"], tensors=runs[0]["tensors"],
                           pruned=runs[0]["pruned"])
                for key in ("seconds", "peak_extra_mb", "kept_mb"):
                    row[key] = statistics.median(run[key] for run in runs)
                rows.append(row)
                print(f"  {row['case']:>14}  {impl:<6} {row['seconds'] * 1e3:10.1f} ms  "
                      f"peak extra {row['peak_extra_mb']:8.1f} MB", flush=True)
    for row in rows:
        dsd = next(r for r in rows if r["case"] == row["case"] and r["impl"] == "dsd")
        row["x_dsd_time"] = row["seconds"] / dsd["seconds"]
        row["x_dsd_peak"] = row["peak_extra_mb"] / dsd["peak_extra_mb"]
    write_rows(args.out, rows)
    print_table([{"case": r["case"], "impl": r["impl"], "ms": r["seconds"] * 1e3,
                  "peak extra MB": r["peak_extra_mb"], "kept MB": r["kept_mb"],
                  "x dsd time": r["x_dsd_time"], "x dsd peak": r["x_dsd_peak"]} for r in rows],
                ["case", "impl", "ms", "peak extra MB", "kept MB", "x dsd time", "x dsd peak"])
    print(f"rows written to {args.out}")


if __name__ == "__main__":
    main()
