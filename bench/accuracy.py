"""Accuracy study: DSD against the equal-budget dense baseline, paired over seeds, on every
embedded task and model (the fair comparison of docs/design.md).

    python bench/accuracy.py                        # every experiment, ~15 min on 2 CPU cores
    python bench/accuracy.py --seeds 3 --tasks digits --experiments main

Experiments:
- main: the `dsd train` defaults (DSD 12+12+12 epochs, sparsity 0.5, Adam lr 2e-3, LR x0.1 at
  re-dense); the baseline trains densely for the same 36 epochs with the same LR drop, from
  the same state after the first dense phase, on the same batches.
- unconverged: the same 36 epochs, but a first dense phase of 2 epochs (2+17+17): DSD prunes
  a network that has not converged, which the paper assumes it has.
- long: a first dense phase of 40 epochs, then 20 + 20 (80 in all), for the MLP and the CNN:
  closer to the paper's setting of pruning a converged network.

Writes bench/results/accuracy_<experiment>.json (every run's numbers, the paired statistics,
the machine and commit) and prints a markdown table. Runs are resumable: they live in
runs/study/ and an interrupted study picks up where it stopped.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment  # noqa: E402

from dsd.study import run_study, table  # noqa: E402

EXPERIMENTS = {
    # checkpoint_every only sets how often a run saves; it does not change the numbers.
    "main": {"settings": {"checkpoint_every": 12}, "models": ["mlp", "cnn", "gru", "lstm"]},
    "unconverged": {"settings": {"checkpoint_every": 12, "phases": [2, 17, 17]},
                    "models": ["mlp", "cnn"], "tasks": ["mnist1d"]},
    "long": {"settings": {"checkpoint_every": 20, "phases": [40, 20, 20]},
             "models": ["mlp", "cnn"]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS),
                        default=list(EXPERIMENTS))
    parser.add_argument("--tasks", nargs="+", default=["mnist1d", "digits"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/study"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in args.experiments:
        experiment = EXPERIMENTS[name]
        tasks = [t for t in args.tasks if t in experiment.get("tasks", args.tasks)]
        result = run_study(tasks, experiment["models"], args.seeds, experiment["settings"],
                           args.work)
        # Training time as measured when each run ran (a rerun reuses finished runs).
        seconds = sum(run["train_seconds"] for cell in result["cells"] for run in cell["runs"])
        result.update(experiment=name, environment=environment("cpu"),
                      train_seconds_total=round(seconds, 1),
                      command=" ".join(["python", "bench/accuracy.py", *sys.argv[1:]]))
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"accuracy_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"\n{name}: {args.seeds} seeds, {seconds:.0f} s of training")
        print(table(result))


if __name__ == "__main__":
    main()
