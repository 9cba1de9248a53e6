"""Where DSD helps: the study of `dsd study`, writing its results into bench/results/.

    python bench/accuracy.py --jobs 2             # docs/study.md's study, ~1.5 h on 2 cores
    python bench/accuracy.py --budget quick       # a few seconds: a check
    python bench/accuracy.py --budget regularised --jobs 2   # rate, dropout, weight decay tuned
    python bench/accuracy.py --tasks text --set device=\\"cuda\\"   # one task, on a GPU

Each cell (a task with one knob at one value) trains DSD and its equal-budget dense baseline at
every point of a grid of learning rates and regularisers (dropout, weight decay) over seeds,
with the test split switched off; each arm picks its point on validation, then the chosen
models are tested, and the cells found are trained again on fresh seeds (src/dsd/study/). Writes
bench/results/study_BUDGET.json (every run, the choices, the paired statistics, the machine and
commit), study_BUDGET.md (the table) and study_BUDGET_REGIME.png (one plot per regime). Runs
live in runs/study/ and an interrupted study picks up where it stopped.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dsd.cli import parse_settings  # noqa: E402
from dsd.study import BUDGETS, run_study, table, write_outputs  # noqa: E402

from _timing import environment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="full")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--regimes", nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=Path("runs/study"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run_study(args.budget, tasks=args.tasks, regimes=args.regimes, seeds=args.seeds,
                       settings=parse_settings(args.set), work=args.work, jobs=args.jobs,
                       say=lambda line: print(line, file=sys.stderr))
    result.update(environment=environment("cpu"),
                  command=" ".join(["python", "bench/accuracy.py", *sys.argv[1:]]))
    write_outputs(result, args.results, f"study_{args.budget}")
    print(f"{result['runs']} runs, {result['train_seconds_total']:.0f} s of training "
          f"(as measured when each run ran)", file=sys.stderr)
    print(table(result), end="")


if __name__ == "__main__":
    main()
