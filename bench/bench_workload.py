"""Whole `dsd train` runs on the paper-style workloads: time per epoch, examples per second,
the masked optimizer's share of the training time, and the final numbers.

    python bench/bench_workload.py --case resnet20   # CIFAR-sized: 50,000 32x32 RGB images
    python bench/bench_workload.py --case text       # `dsd train --task text --baseline`

resnet20: CIFAR-10's layout and size (50,000 training images, 10,000 test) written in the real
pickle format with random pixels (no download here; the compute per image is the same as for
real CIFAR), trained as He et al. train it (SGD, momentum 0.9, weight decay 1e-4, lr 0.1,
batch 128) for one dense and one sparse epoch. In the same run, one step of torch.optim.SGD
(foreach) and of MaskedSGD with every prunable tensor masked at 0.5 are timed on resnet20's
parameters, so the step's cost stands beside torch's.
text: the embedded corpus with the defaults (`dsd train --task text --baseline`); its bits per
character on the held-out split are the result.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from _timing import environment, median_seconds, print_table, write_rows

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import dsd_kernels as dk  # noqa: E402
from dsd.config import RunConfig  # noqa: E402
from dsd.models import build_model  # noqa: E402
from dsd.runner import prunable_parameters  # noqa: E402
from dsd.train import train  # noqa: E402
from dsd_kernels.optim import MaskedSGD  # noqa: E402

import _fake_data  # noqa: E402

CIFAR_RECIPE = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128)


def _epochs(summary: dict, run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"arm": r["arm"], "epoch": r["epoch"], "kind": r["kind"],
             "train_examples": summary["examples"]["train"],
             "train_seconds": r["train_seconds"], "epoch_seconds": r["seconds"],
             "examples_per_second": r["examples_per_second"],
             "optimizer_share": r["optimizer_share"]} for r in rows]


def _step_ms(device: str) -> dict:
    """ms per step of torch.optim.SGD (foreach) and MaskedSGD (masks at 0.5) on resnet20."""
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    torch_sgd = torch.optim.SGD(params, **{k: CIFAR_RECIPE[k] for k in ("lr", "momentum",
                                                                         "weight_decay")},
                                foreach=True)
    masked = MaskedSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    prunable = [p for _, p in prunable_parameters(model)]
    masked.set_masks(dict(zip(prunable, dk.magnitude_masks([p.detach() for p in prunable],
                                                           0.5))))
    return {"torch_sgd_ms": 1e3 * median_seconds(torch_sgd.step, device),
            "masked_sgd_ms": 1e3 * median_seconds(masked.step, device)}


def _threads(args) -> dict:
    return {} if args.threads is None else {"threads": args.threads}


def resnet20(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        data = _fake_data.write_cifar(tmp, per_batch=args.images // 5, test=10_000)
        config = RunConfig.from_mapping(dict(CIFAR_RECIPE, task="cifar10", data=str(data),
                                             model="resnet20", phases=[1, 1],
                                             device=args.device, **_threads(args)))
        run_dir = Path(tmp) / "run"
        summary = train(config, run_dir, quiet=True)
        rows = _epochs(summary, run_dir)
    steps = _step_ms(args.device)
    for row in rows:
        row.update(case="resnet20", images=args.images, **steps)
    return rows


def text(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig.from_mapping(dict(task="text", baseline=True, device=args.device,
                                             **_threads(args)))
        run_dir = Path(tmp) / "run"
        summary = train(config, run_dir, quiet=True)
        rows = _epochs(summary, run_dir)
    final = {arm: summary["arms"][arm]["final"]["test_bpc"] for arm in ("dsd", "baseline")}
    for row in rows:
        row.update(case="text", dsd_test_bpc=final["dsd"], baseline_test_bpc=final["baseline"],
                   train_seconds_total=summary["train_seconds"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("resnet20", "text"), required=True)
    parser.add_argument("--images", type=int, default=50_000, help="resnet20: training images")
    parser.add_argument("--threads", type=int, help="torch threads (0: torch's default; "
                        "default: dsd train's, 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON file (default bench/results/<device>_<case>.json)")
    args = parser.parse_args()
    rows = resnet20(args) if args.case == "resnet20" else text(args)
    env = environment(args.device)
    for row in rows:
        row.update(env)
    columns = ["arm", "epoch", "kind", "train_seconds", "examples_per_second", "optimizer_share"]
    columns += ["torch_sgd_ms", "masked_sgd_ms"] if args.case == "resnet20" else \
        ["dsd_test_bpc", "baseline_test_bpc"]
    print_table(rows, columns)
    out = args.out or Path(__file__).parent / "results" / f"{args.device}_workload_{args.case}.json"
    write_rows(out, rows)


if __name__ == "__main__":
    main()
