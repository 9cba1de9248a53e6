"""Running a study: train every run its cells need (resumable), choose each arm's learning rate
and regulariser on validation, widen a rate grid whose edge is chosen, then test the chosen
models and compare.

The cells found are then trained again on fresh seeds at the points chosen, and tested: the
confirmation. Runs live in the work directory, named by a hash of their config, so an
interrupted study resumes where it stopped (design.md, "The study").
"""

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import RunConfig
from ..train import DivergedError, evaluate_saved, train
from .budgets import ARMS, BUDGETS, REGIMES, UNREGULARISED, Cell, cells_of, digest
from .stats import ALPHA, correct, correct_confirmation, paired_test

_TRAINER_ARM = dict(zip(ARMS, ("dsd", "baseline")))  # the arm's name in a run's files
_RECORD = "study_record.json"  # in each run directory: the run's validation numbers
_TUNED = ("lr", "dropout", "weight_decay")  # the options each arm chooses on validation


def run_study(budget: str = "full", *, tasks=None, regimes=None, seeds: int | None = None,
              settings: dict | None = None, work: Path = Path("runs/study"), jobs: int = 1,
              say=print) -> dict:
    """Train every run the cells need (resumable in `work`), choose each arm's learning rate
    and regulariser per cell on validation (widening a rate grid whose edge is chosen), then
    evaluate the chosen models on the test split and test the differences; train every cell
    found (Holm p < 0.05) again on fresh seeds at its chosen points, and test those.

    Args:
        budget: a key of `BUDGETS` ("quick": seconds, a check; "full": docs/study.md's study).
        tasks: only these of the budget's tasks (None: all).
        regimes: only these of the budget's regimes (None: all).
        seeds: seeds per cell, at least 2 (None: the budget's).
        settings: run options for every run, as config-file keys (e.g. {"device": "cuda"}).
        work: the directory of the runs; a run already recorded there is not trained again.
        jobs: runs trained at once, each in its own process.
        say: called with each progress line.

    Returns:
        The study as a JSON-ready dict: per cell the grid, every run's validation numbers,
        each arm's choice, the test scores and the paired tests with Holm and BH p-values,
        and the confirmation on fresh seeds (None for a cell not found).

    Raises:
        ValueError: an unknown budget, task or regime, too few seeds or jobs, or a bad or
            study-owned setting, before anything is written; or a run's own error (e.g.
            dsd.data.DataError for data it cannot read).
    """
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    seeds = BUDGETS[budget]["seeds"] if seeds is None else seeds
    if seeds < 2:
        raise ValueError("--seeds must be at least 2 for a paired test")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    cells = cells_of(budget, tasks, regimes, settings)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    records, began = None, time.perf_counter()

    def run_of(cell, point, seed):
        config = cell.run_config(point, seed)
        return _run_dir(work, config), records[digest(config.to_dict())]

    # Every choice first, from validation numbers only: a choice at the edge of the rates its
    # regulariser was tried at widens them by a factor 2 that way (at most `extensions` times
    # each way per regulariser) ...
    extensions = {id(cell): {} for cell in cells}
    while True:
        runs = _runs(cells, seeds)
        records = _train_all(runs, work, jobs, say)
        choices = [choose(cell, {point: [run_of(cell, point, s)[1] for s in range(seeds)]
                                 for point in cell.grid}) for cell in cells]
        widened = [_widen(cell, choice, extensions[id(cell)], BUDGETS[budget]["extensions"])
                   for cell, choice in zip(cells, choices)]
        if not any(widened):
            break
    # ... then the test split, of the chosen runs and of the reference-LR runs; cells that
    # share a config, and the two comparisons of a cell, often name the same run.
    tested = {}

    def test_scores(run_dir, arm):
        if (run_dir, arm) not in tested:
            tested[run_dir, arm] = evaluate_saved(run_dir, "test", _TRAINER_ARM[arm])
        return tested[run_dir, arm]

    results = []
    for cell, choice in zip(cells, choices):
        comparisons = {"tuned": tuple(_point(choice[arm]) for arm in ARMS),
                       "same_lr": ((cell.reference_lr, *UNREGULARISED),) * 2}
        result = {"task": cell.task, "regime": cell.regime, "value": cell.value,
                  "grid_extensions": [{"dropout": d, "weight_decay": wd, **done} for (d, wd),
                                      done in extensions[id(cell)].items()],
                  "shown": REGIMES[cell.regime].shown(cell.value), "key": cell.key(),
                  "metric": cell.metric, "higher_is_better": cell.higher_is_better,
                  "config": {k: v for k, v in cell.config.to_dict().items()
                             if k not in _TUNED},
                  "grid": [list(point) for point in cell.grid], "choice": choice,
                  "runs": [{**dict(zip(_TUNED, point)), "seed": s, **run_of(cell, point, s)[1]}
                           for point in cell.grid for s in range(seeds)]}
        for name, points in comparisons.items():
            result[name] = _compare(cell, points, [[run_of(cell, point, s) for s in range(seeds)]
                                                   for point in points], test_scores)
        results.append(result)
    correct(results)
    # Confirmation: the cells found (Holm p < ALPHA) train again on the next `seeds` seeds, at
    # the points already chosen: no run of the grid, no new choice.
    fresh = range(seeds, 2 * seeds)
    found = {result["key"]: (cell, result["tuned"]["at"]) for cell, result in zip(cells, results)
             if not result["tuned"]["diverged"] and result["tuned"]["p_holm"] < ALPHA}
    confirming = {digest(config.to_dict()): config for cell, at in found.values()
                  for arm in ARMS for config in (cell.run_config(_point(at[arm]), s)
                                                 for s in fresh)}
    records.update(_train_all(confirming, work, jobs, say) if confirming else {})
    confirmed = {}
    for key, (cell, at) in found.items():
        points = tuple(_point(at[arm]) for arm in ARMS)
        confirmed[key] = {"seeds": list(fresh), **_compare(
            cell, points, [[run_of(cell, point, s) for s in fresh] for point in points],
            test_scores)}
    for result in results:
        result["confirmation"] = confirmed.get(result["key"])
    correct_confirmation(results)
    seconds = sum(record["train_seconds"] for record in records.values())
    return {"budget": budget, "seeds": seeds, "confirmation_seeds": [fresh.start, fresh.stop],
            "settings": settings or {},
            "regimes": {name: REGIMES[name].label for name in
                        dict.fromkeys(c["regime"] for c in results)},
            "runs": len(runs) + len(confirming), "confirmation_runs": len(confirming),
            "train_seconds_total": round(seconds, 1),
            "wall_seconds_this_call": round(time.perf_counter() - began, 1), "jobs": jobs,
            "cells": results}


def _point(chosen: dict) -> tuple:
    """An arm's choice as its grid point (lr, dropout, weight_decay)."""
    return tuple(chosen[key] for key in _TUNED)


def _runs(cells: list[Cell], seeds: int) -> dict:
    """{run config digest: config} of every run of the cells (shared runs once)."""
    runs = {}
    for cell in cells:
        for point in cell.grid:
            for seed in range(seeds):
                config = cell.run_config(point, seed)
                runs[digest(config.to_dict())] = config
    return runs


def _run_dir(work: Path, config: RunConfig) -> Path:
    return work / f"{config.task}-s{config.seed}-{digest(config.to_dict())}"


def train_one(config: RunConfig, run_dir: Path) -> dict:
    """Train one run (resuming it if it was interrupted) and record its final validation
    numbers, or that it diverged, in the run directory; a recorded run is not trained again."""
    record_path = run_dir / _RECORD
    if record_path.exists():
        return json.loads(record_path.read_text())
    began = time.perf_counter()
    try:
        summary = train(config, run_dir, quiet=True)
        record = {"diverged": None, "train_seconds": summary["train_seconds"],
                  **{arm: {k: v for k, v in summary["arms"][_TRAINER_ARM[arm]]["final"].items()
                           if k.startswith("val_")} for arm in ARMS}}
    except DivergedError as error:
        record = {"diverged": str(error), "train_seconds": time.perf_counter() - began}
    record_path.write_text(json.dumps(record) + "\n")
    return record


def _train_all(runs: dict, work: Path, jobs: int, say) -> dict:
    """{digest: record} for every run; the runs not yet recorded are trained, `jobs` at once."""
    records, todo = {}, []
    for key, config in runs.items():
        path = _run_dir(work, config) / _RECORD
        if path.exists():
            records[key] = json.loads(path.read_text())
        else:
            todo.append(key)
    say(f"{len(runs)} runs: {len(records)} done, {len(todo)} to train")
    bar = tqdm(total=len(todo), unit="run", desc="study", smoothing=0.05, disable=not todo)
    if jobs == 1:
        for key in todo:
            records[key] = train_one(runs[key], _run_dir(work, runs[key]))
            bar.update()
    else:  # fresh interpreters: forked ones would inherit torch's thread pools
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_one, runs[key], _run_dir(work, runs[key])): key
                       for key in todo}
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update()
    bar.close()
    return records


def _score(record: dict, arm: str, cell: Cell) -> float:
    """The validation score an arm is tuned on (higher is better); a diverged run scores -inf."""
    if record["diverged"]:
        return -math.inf
    value = record[arm][f"val_{cell.metric}"]
    return value if cell.higher_is_better else -value


def choose(cell: Cell, records_by_point: dict) -> dict:
    """{arm: {"lr", "dropout", "weight_decay", "val_mean", "val_means", "at_grid_edge"}}: each
    arm's grid point (lr, dropout, weight_decay) with the best mean validation score over
    seeds, over the whole grid (the first in grid order on a tie), from validation only.
    `at_grid_edge`: the chosen rate is the lowest or highest tried with the chosen
    regulariser."""
    chosen = {}
    sign = 1 if cell.higher_is_better else -1
    for arm in ARMS:
        means = [float(np.mean([_score(r, arm, cell) for r in records_by_point[point]]))
                 for point in cell.grid]
        best = int(np.argmax(means))
        lr, dropout, weight_decay = cell.grid[best]
        rates = _rates(cell.grid, (dropout, weight_decay))
        chosen[arm] = {"lr": lr, "dropout": dropout, "weight_decay": weight_decay,
                       "val_mean": sign * means[best],
                       "val_means": [[*point, sign * m] for point, m in zip(cell.grid, means)],
                       "at_grid_edge": len(rates) > 1 and lr in (rates[0], rates[-1])}
    return chosen


def _rates(grid: tuple, regulariser: tuple) -> list:
    """The rates of `grid` tried with `regulariser`, ascending."""
    return sorted(lr for lr, *other in grid if tuple(other) == regulariser)


def _widen(cell: Cell, choice: dict, done: dict, most: int) -> bool:
    """Add a rate beyond an edge of the rates that an arm's chosen regulariser was tried at
    (while `done[regulariser]` counts fewer than `most` additions that way); True if the grid
    grew. The grid keeps its order: regularisers as first listed, rates ascending."""
    added = set()
    for arm in ARMS:
        lr, *regulariser = _point(choice[arm])
        regulariser = tuple(regulariser)
        rates = _rates(cell.grid, regulariser)
        count = done.setdefault(regulariser, {"up": 0, "down": 0})
        if lr == rates[-1] and count["up"] < most and (rates[-1] * 2, *regulariser) not in added:
            added.add((rates[-1] * 2, *regulariser))
            count["up"] += 1
        if lr == rates[0] and count["down"] < most and (rates[0] / 2, *regulariser) not in added:
            added.add((rates[0] / 2, *regulariser))
            count["down"] += 1
    order = list(dict.fromkeys(tuple(other) for _, *other in cell.grid))
    cell.grid = tuple(sorted((*cell.grid, *added),
                             key=lambda point: (order.index(tuple(point[1:])), point[0])))
    return bool(added)


def _compare(cell: Cell, points: tuple, runs: list[list], test_scores) -> dict:
    """Test numbers of each arm at its grid point, per seed (`test_scores(run_dir, arm)`), and
    the paired test of DSD minus dense; None where a run at that point diverged."""
    key = f"test_{cell.metric}"
    chosen = {arm: dict(zip(_TUNED, point)) for arm, point in zip(ARMS, points)}
    lrs = {arm: point[0] for arm, point in zip(ARMS, points)}
    if any(record["diverged"] for arm_runs in runs for _, record in arm_runs):
        return {"lr": lrs, "at": chosen, "diverged": True}
    tests = {arm: [test_scores(run_dir, arm)[key] for run_dir, _ in arm_runs]
             for arm, arm_runs in zip(ARMS, runs)}
    return {"lr": lrs, "at": chosen, "diverged": False,
            "dsd_test": tests["dsd"], "dense_test": tests["dense"],
            "dsd_mean": float(np.mean(tests["dsd"])), "dense_mean": float(np.mean(tests["dense"])),
            "dsd_sd": float(np.std(tests["dsd"], ddof=1)),
            "dense_sd": float(np.std(tests["dense"], ddof=1)),
            "paired": paired_test(tests["dsd"], tests["dense"])}
