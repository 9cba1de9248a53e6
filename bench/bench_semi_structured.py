"""A 2:4-pruned Linear's forward: dense against torch's semi-structured kernels after
`to_semi_structured_`, timed in the same run, and how far apart their outputs are.

    python bench/bench_semi_structured.py --device cuda --out bench/results/semi_structured.json

Weights (out, in), fp16, a batch of --tokens rows: 4096x4096, and GPT-2 small's MLP (c_fc
3072x768, c_proj 768x3072). Each Linear is pruned by `prune.nm_structured_model` (2:4), the
pruning removed, copied, and the copy converted. Rows: one per shape and kernel ("dense",
"2:4 semi-structured") with the median forward time; the sparse row also has the speedup
(dense seconds / sparse seconds) and the outputs' largest difference, absolute and over the
largest dense output. Without CUDA it prints why it skips and exits 0, writing no rows.
"""

import argparse
import copy
import sys

import torch
from torch import nn

from dsd_kernels import prune
from dsd_kernels.semi_structured import to_semi_structured_

from _timing import environment, median_seconds, print_table, write_rows

SHAPES = {"4096x4096": (4096, 4096), "gpt2-c_fc": (3072, 768), "gpt2-c_proj": (768, 3072)}


def measure(case: str, out_features: int, in_features: int, args, env: dict) -> list[dict]:
    torch.manual_seed(0)
    # Pruned on the CPU: the masks' kernels are timed by bench_mask.py, not here.
    dense = nn.Linear(in_features, out_features).half()
    prune.nm_structured_model(dense, "2:4")
    prune.remove(dense, "weight")
    dense.to(args.device)
    sparse = copy.deepcopy(dense)
    report = to_semi_structured_(sparse)
    if not report.converted:
        raise SystemExit(f"{case}: not converted: {report.dense}")
    x = torch.randn(args.tokens, in_features, device=args.device, dtype=torch.float16)
    with torch.no_grad():
        reference, result = dense(x), sparse(x)
        times = {kernel: median_seconds(lambda m=module: m(x), args.device,
                                        min_time=args.min_time)
                 for kernel, module in (("dense", dense), ("2:4 semi-structured", sparse))}
    diff = float((result.float() - reference.float()).abs().max())
    largest = float(reference.float().abs().max())
    row = dict(env, case=case, shape=[out_features, in_features], tokens=args.tokens,
               dtype="float16", backend=getattr(sparse.weight, "BACKEND", None))
    return [dict(row, impl="dense", seconds=times["dense"]),
            dict(row, impl="2:4 semi-structured", seconds=times["2:4 semi-structured"],
                 speedup=times["dense"] / times["2:4 semi-structured"],
                 max_abs_diff=diff, max_abs_diff_over_max_abs=diff / largest)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=4096, help="rows of the input batch")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--out", help="JSON rows, rewritten after each shape")
    args = p.parse_args(argv)
    names = args.shapes.split(",")
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        p.error(f"unknown shape {', '.join(unknown)}; the shapes are {', '.join(SHAPES)}")
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print(f"skipped: torch's semi-structured kernels run on CUDA only (device "
              f"{args.device}, CUDA {'available' if torch.cuda.is_available() else 'absent'})")
        return 0
    if torch.cuda.get_device_capability(args.device) < (8, 0):
        print("skipped: torch's semi-structured kernels need compute capability 8.0 or later")
        return 0
    env, rows = environment(args.device), []
    for name in names:
        rows += measure(name, *SHAPES[name], args, env)
        if args.out:
            write_rows(args.out, rows)
    print_table(rows, ["case", "impl", "seconds", "speedup", "max_abs_diff",
                       "max_abs_diff_over_max_abs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
