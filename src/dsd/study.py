"""Where does DSD help? DSD against a tuned dense baseline, one knob at a time, paired over seeds.

A cell is one task with one knob (a regime) at one value and everything else at the task's
defaults. In a cell, every seed trains both arms at every learning rate of a grid (`dsd train
--baseline`: the two arms share the initialisation, the first dense phase and every batch) with
the test split switched off. Each arm then picks its own learning rate, the one with the best
mean validation score over the seeds; only after every choice is made are the chosen models (and
those at the reference learning rate, the same-LR comparison) evaluated on the test split.

Per cell, the seeds pair the two arms: a paired t-test of DSD minus dense gives the mean
difference, its 95% interval and a p-value; Holm's correction over every distinct cell of the
study (Benjamini-Hochberg's is reported too) keeps one lucky cell out of forty from reading as
a finding. Runs live in the work directory, named by a hash of their config, so an interrupted
study resumes where it stopped.
"""

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig
from .train import DivergedError, evaluate_saved, train

ALPHA = 0.05  # family-wise error rate of the verdicts (Holm)
# Keys the study sets in every run itself, and how to choose them instead.
OWNED = {"task": "give --tasks", "seed": "give --seeds: the runs take seeds 0 to N-1",
         "baseline": "every run trains the baseline: the study pairs with it",
         "lr": "every arm picks its own from the budget's grid on validation",
         "evaluate_test": "runs never read the test split; the study evaluates it after the "
                          "learning rates are chosen"}
ARMS = ("dsd", "dense")
_TRAINER_ARM = dict(zip(ARMS, ("dsd", "baseline")))  # the arm's name in a run's files


@dataclass(frozen=True)
class Regime:
    """A knob: `settings(value, base)` gives the run options of one value over the task's
    base config; `label` names the knob in tables and plots."""
    label: str
    settings: Callable[[object, RunConfig], dict]
    shown: Callable[[object], str] = str
    models: tuple = ()  # the models the knob exists for (empty: any)


REGIMES = {
    "label_noise": Regime("label noise (share of training labels)",
                          lambda v, base: {"label_noise": v}, lambda v: f"{v:.0%}"),
    "train_examples": Regime("training examples", lambda v, base: {"train_examples": v},
                             lambda v: str(v) if v else "all"),
    "width": Regime("MLP width (hidden units w, w/3)",
                    lambda v, base: {"mlp_hidden": [v, max(1, v // 3)]}, models=("auto", "mlp")),
    "first_phase": Regime("first dense phase (epochs)",
                          lambda v, base: {"phases": [v, *base.phases[1:]]}),
    "sparsity": Regime("sparsity", lambda v, base: {"sparsity": v}, lambda v: f"{v:.0%}"),
    "iterations": Regime("dense-sparse iterations",
                         lambda v, base: {"phases": [base.phases[0]] * (2 * v + 1)},
                         lambda v: "D" + "SD" * v),
    "optimizer": Regime("optimizer", lambda v, base: {"optimizer": v}),
}


@dataclass(frozen=True)
class TaskStudy:
    """What a budget runs on one task: base run options, the regimes' values and, per
    optimizer, the learning-rate grid with its reference rate (the same-LR comparison)."""
    base: dict
    regimes: dict
    lrs: dict = field(default_factory=lambda: {
        "adam": ((5e-4, 1e-3, 2e-3, 4e-3), 2e-3), "sgd": ((0.0125, 0.025, 0.05, 0.1), 0.05)})


_CLASSIFICATION_REGIMES = {
    "label_noise": (0.0, 0.2, 0.4), "width": (100, 300, 1000),
    "first_phase": (3, 12, 48), "sparsity": (0.3, 0.5, 0.7, 0.9), "iterations": (1, 2),
    "optimizer": ("adam", "sgd")}
_SAVES = {"checkpoint_every": 100}  # a resumable checkpoint at the branch and the end only
BUDGETS = {
    # Sized for a test: a few seconds on one core.
    "quick": {"seeds": 2, "extensions": 1, "tasks": {"digits": TaskStudy(
        {"phases": [2, 2, 2], "mlp_hidden": [32, 16]},
        {"sparsity": (0.5, 0.9), "label_noise": (0.0, 0.3)},
        {"adam": ((1e-3, 4e-3), 4e-3)})}},
    # The README's study: about 1.5 hours on 2 CPU cores with --jobs 2.
    "full": {"seeds": 8, "extensions": 2, "tasks": {
        "mnist1d": TaskStudy(_SAVES, {**_CLASSIFICATION_REGIMES,
                                      "train_examples": (250, 500, 1000, 0)}),
        "digits": TaskStudy(_SAVES, {**_CLASSIFICATION_REGIMES,
                                     "train_examples": (250, 500, 0)}),
        "text": TaskStudy({**_SAVES, "phases": [5, 5, 5]}, {"sparsity": (0.3, 0.5)},
                          {"adam": ((1e-3, 2e-3, 4e-3), 2e-3)}),
    }},
}


# ---- statistics ---------------------------------------------------------------------------

def paired_test(treated, control) -> dict:
    """Paired t-test of treated - control: mean, spread, 95% interval, two-sided p-value.

    When every pair differs by exactly the same amount (common when accuracies move by whole
    test examples), the t statistic is undefined: p_value and outside_noise are then None.
    """
    diffs = np.asarray(treated, dtype=float) - np.asarray(control, dtype=float)
    n = len(diffs)
    if n < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    if np.allclose(diffs, diffs[0], rtol=0, atol=1e-12):  # equal up to float rounding
        return {"n": n, "mean_diff": mean, "sd_diff": 0.0, "ci95": None, "p_value": None,
                "outside_noise": None}
    se = sd / math.sqrt(n)
    p_value = float(2 * stats.t.sf(abs(mean / se), n - 1))
    half_width = float(stats.t.ppf(0.975, n - 1) * se)
    return {"n": n, "mean_diff": mean, "sd_diff": sd,
            "ci95": [mean - half_width, mean + half_width], "p_value": p_value,
            "outside_noise": p_value < 0.05}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def benjamini_hochberg(p_values) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input's order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return adjusted.tolist()


# ---- the study ----------------------------------------------------------------------------

@dataclass
class Cell:
    task: str
    regime: str
    value: object
    config: RunConfig  # the cell's options; lr and seed vary over its runs
    grid: tuple
    reference_lr: float
    higher_is_better: bool
    metric: str  # "acc" or "bpc"

    def key(self) -> str:  # cells with equal configs share runs and count once in the family
        return _digest(self.config.to_dict())


def _digest(mapping: dict) -> str:
    return hashlib.sha1(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:10]


def cells_of(budget: str, tasks=None, regimes=None, settings: dict | None = None) -> list[Cell]:
    """Every cell of `budget` (restricted to `tasks` and `regimes`, with `settings` over each
    task's base), each config validated: a bad option fails here, before any run."""
    settings = settings or {}
    for key in settings:
        if key in OWNED:
            raise ValueError(f"--set {key}: the study sets {key} itself ({OWNED[key]})")
    spec = BUDGETS[budget]["tasks"]
    tasks = list(spec) if tasks is None else tasks
    for task in tasks:
        if task not in spec:
            raise ValueError(f"--tasks: budget {budget} has no task {task!r}; it runs "
                             f"{', '.join(spec)}")
    cells = []
    for task in tasks:
        study = spec[task]
        chosen = list(study.regimes) if regimes is None else [r for r in regimes
                                                              if r in study.regimes]
        try:
            base = RunConfig.from_mapping({**study.base, **settings, "task": task,
                                           "baseline": True, "evaluate_test": False})
        except ConfigError as error:
            raise error.labelled(f"--set {error.key}") from None
        for regime in chosen:
            if REGIMES[regime].models and base.model not in REGIMES[regime].models:
                raise ValueError(f"regime {regime} is for model {REGIMES[regime].models[-1]}, "
                                 f"not {base.model!r}; leave it out with --regimes")
            for value in study.regimes[regime]:
                config = RunConfig.from_mapping(REGIMES[regime].settings(value, base), base=base)
                if config.optimizer not in study.lrs:
                    raise ValueError(f"budget {budget} has no learning-rate grid for optimizer "
                                     f"{config.optimizer!r} on task {task}")
                grid, reference = study.lrs[config.optimizer]
                text = task == "text"
                cells.append(Cell(task, regime, value, config, tuple(grid), reference,
                                  higher_is_better=not text, metric="bpc" if text else "acc"))
    if regimes is not None:
        known = {r for task in tasks for r in spec[task].regimes}
        for regime in regimes:
            if regime not in known:
                raise ValueError(f"--regimes: {regime!r} is not a regime of budget {budget} "
                                 f"on {', '.join(tasks)}; choose from {', '.join(sorted(known))}")
    return cells


def _runs(cells: list[Cell], seeds: int) -> dict:
    """{run config digest: config} of every run of the cells (shared runs once)."""
    runs = {}
    for cell in cells:
        for lr in cell.grid:
            for seed in range(seeds):
                config = RunConfig.from_mapping({"lr": lr, "seed": seed}, base=cell.config)
                runs[_digest(config.to_dict())] = config
    return runs


def _run_dir(work: Path, config: RunConfig) -> Path:
    return work / f"{config.task}-s{config.seed}-{_digest(config.to_dict())}"


_RECORD = "study_record.json"  # in each run directory: the run's validation numbers


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
    for digest, config in runs.items():
        path = _run_dir(work, config) / _RECORD
        if path.exists():
            records[digest] = json.loads(path.read_text())
        else:
            todo.append(digest)
    say(f"{len(runs)} runs: {len(records)} done, {len(todo)} to train")
    bar = tqdm(total=len(todo), unit="run", desc="study", smoothing=0.05, disable=not todo)
    if jobs == 1:
        for digest in todo:
            records[digest] = train_one(runs[digest], _run_dir(work, runs[digest]))
            bar.update()
    else:  # fresh interpreters: forked ones would inherit torch's thread pools
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_one, runs[d], _run_dir(work, runs[d])): d
                       for d in todo}
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


def choose_lr(cell: Cell, records_by_lr: dict) -> dict:
    """{arm: {"lr", "val_mean", "at_grid_edge"}}: each arm's learning rate with the best mean
    validation score over seeds (the first in grid order on a tie), from validation only."""
    chosen = {}
    for arm in ARMS:
        means = [float(np.mean([_score(r, arm, cell) for r in records_by_lr[lr]]))
                 for lr in cell.grid]
        best = int(np.argmax(means))
        sign = 1 if cell.higher_is_better else -1
        chosen[arm] = {"lr": cell.grid[best], "val_mean": sign * means[best],
                       "val_means": {str(lr): sign * m for lr, m in zip(cell.grid, means)},
                       "at_grid_edge": len(cell.grid) > 1 and best in (0, len(cell.grid) - 1)}
    return chosen


def _widen(cell: Cell, choice: dict, done: dict, most: int) -> bool:
    """Add a rate beyond an edge of the cell's grid that an arm chose (while `done` counts
    fewer than `most` additions that way); True if the grid grew."""
    grid = list(cell.grid)
    chosen = {choice[arm]["lr"] for arm in ARMS}
    if grid[-1] in chosen and done["up"] < most:
        grid.append(grid[-1] * 2)
        done["up"] += 1
    if grid[0] in chosen and done["down"] < most:
        grid.insert(0, grid[0] / 2)
        done["down"] += 1
    widened = len(grid) > len(cell.grid)
    cell.grid = tuple(grid)
    return widened


def run_study(budget: str = "full", *, tasks=None, regimes=None, seeds: int | None = None,
              settings: dict | None = None, work: Path = Path("runs/study"), jobs: int = 1,
              say=print) -> dict:
    """Train every run the cells need (resumable in `work`), choose each arm's learning rate
    per cell on validation (widening a grid whose edge is chosen), then evaluate the chosen
    models on the test split and test the differences."""
    seeds = BUDGETS[budget]["seeds"] if seeds is None else seeds
    if seeds < 2:
        raise ValueError("--seeds must be at least 2 for a paired test")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    cells = cells_of(budget, tasks, regimes, settings)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    records, began = None, time.perf_counter()

    def run_of(cell, lr, seed):
        config = RunConfig.from_mapping({"lr": lr, "seed": seed}, base=cell.config)
        return _run_dir(work, config), records[_digest(config.to_dict())]

    # Every choice first, from validation numbers only: a choice at the edge of its grid
    # widens the grid by a factor 2 that way (at most `extensions` times each way) ...
    extensions = {id(cell): {"up": 0, "down": 0} for cell in cells}
    while True:
        runs = _runs(cells, seeds)
        records = _train_all(runs, work, jobs, say)
        choices = [choose_lr(cell, {lr: [run_of(cell, lr, s)[1] for s in range(seeds)]
                                    for lr in cell.grid}) for cell in cells]
        widened = [_widen(cell, choice, extensions[id(cell)], BUDGETS[budget]["extensions"])
                   for cell, choice in zip(cells, choices)]
        if not any(widened):
            break
    train_wall = time.perf_counter() - began
    # ... then the test split, of the chosen runs and of the reference-LR runs; cells that
    # share a config, and the two comparisons of a cell, often name the same run.
    tested = {}

    def test_scores(run_dir, arm):
        if (run_dir, arm) not in tested:
            tested[run_dir, arm] = evaluate_saved(run_dir, "test", _TRAINER_ARM[arm])
        return tested[run_dir, arm]

    results = []
    for cell, choice in zip(cells, choices):
        comparisons = {"tuned": (choice["dsd"]["lr"], choice["dense"]["lr"]),
                       "same_lr": (cell.reference_lr, cell.reference_lr)}
        result = {"task": cell.task, "regime": cell.regime, "value": cell.value,
                  "grid_extensions": extensions[id(cell)],
                  "shown": REGIMES[cell.regime].shown(cell.value), "key": cell.key(),
                  "metric": cell.metric, "higher_is_better": cell.higher_is_better,
                  "config": {k: v for k, v in cell.config.to_dict().items() if k != "lr"},
                  "grid": list(cell.grid), "choice": choice,
                  "runs": [{"lr": lr, "seed": s, **run_of(cell, lr, s)[1]}
                           for lr in cell.grid for s in range(seeds)]}
        for name, lrs in comparisons.items():
            result[name] = _compare(cell, lrs, [[run_of(cell, lr, s) for s in range(seeds)]
                                                for lr in lrs], test_scores)
        results.append(result)
    _correct(results)
    seconds = sum(record["train_seconds"] for record in records.values())
    return {"budget": budget, "seeds": seeds, "settings": settings or {},
            "regimes": {name: REGIMES[name].label for name in
                        dict.fromkeys(c["regime"] for c in results)},
            "runs": len(runs), "train_seconds_total": round(seconds, 1),
            "wall_seconds_this_call": round(train_wall, 1), "jobs": jobs, "cells": results}


def _compare(cell: Cell, lrs: tuple, runs: list[list], test_scores) -> dict:
    """Test numbers of each arm at its learning rate, per seed (`test_scores(run_dir, arm)`),
    and the paired test of DSD minus dense; None where a run at that rate diverged."""
    key = f"test_{cell.metric}"
    if any(record["diverged"] for arm_runs in runs for _, record in arm_runs):
        return {"lr": dict(zip(ARMS, lrs)), "diverged": True}
    tests = {arm: [test_scores(run_dir, arm)[key] for run_dir, _ in arm_runs]
             for arm, arm_runs in zip(ARMS, runs)}
    return {"lr": dict(zip(ARMS, lrs)), "diverged": False,
            "dsd_test": tests["dsd"], "dense_test": tests["dense"],
            "dsd_mean": float(np.mean(tests["dsd"])), "dense_mean": float(np.mean(tests["dense"])),
            "dsd_sd": float(np.std(tests["dsd"], ddof=1)),
            "dense_sd": float(np.std(tests["dense"], ddof=1)),
            "paired": paired_test(tests["dsd"], tests["dense"])}


def _correct(results: list[dict]) -> None:
    """Holm and BH over the distinct cells, per comparison; a verdict per cell. A cell whose
    differences have no spread (or whose runs diverged) counts as p = 1: never a finding."""
    for name in ("tuned", "same_lr"):
        family = {}
        for result in results:
            compared = result[name]
            p = 1.0 if compared["diverged"] or compared["paired"]["p_value"] is None \
                else compared["paired"]["p_value"]
            family[result["key"]] = p
        keys = list(family)
        adjusted = dict(zip(keys, zip(holm([family[k] for k in keys]),
                                      benjamini_hochberg([family[k] for k in keys]))))
        for result in results:
            compared = result[name]
            compared["p_holm"], compared["p_bh"] = adjusted[result["key"]]
            compared["family_size"] = len(keys)
            compared["verdict"] = _verdict(compared, result["higher_is_better"])


def _verdict(compared: dict, higher_is_better: bool) -> str:
    if compared["diverged"]:
        return "diverged"
    if compared["p_holm"] >= ALPHA:
        return "tie"
    better = compared["paired"]["mean_diff"] > 0 if higher_is_better \
        else compared["paired"]["mean_diff"] < 0
    return "DSD better" if better else "DSD worse"


# ---- reports ------------------------------------------------------------------------------

def _shown_metric(value: float, metric: str) -> str:
    return f"{value:.3f}" if metric == "bpc" else f"{100 * value:.2f}"


def _shown_diff(compared: dict, metric: str) -> str:
    if compared["diverged"]:
        return "diverged"
    paired = compared["paired"]
    scale, digits = (1, 3) if metric == "bpc" else (100, 2)
    text = f"{scale * paired['mean_diff']:+.{digits}f}"
    if paired["ci95"] is None:
        return text + " on every seed"
    low, high = (scale * x for x in paired["ci95"])
    return f"{text} ({low:+.{digits}f}, {high:+.{digits}f})"


def table(result: dict) -> str:
    """Markdown: per task and regime, each arm's chosen LR and test score, the tuned and the
    same-LR differences with 95% intervals, Holm-adjusted p-values and verdicts."""
    lines = []
    for task in dict.fromkeys(c["task"] for c in result["cells"]):
        cells = [c for c in result["cells"] if c["task"] == task]
        unit = "bits per character, lower is better" if cells[0]["metric"] == "bpc" \
            else "test accuracy %"
        lines += [f"**{task}** ({unit}; differences DSD − dense)", "",
                  "| regime | value | LR DSD / dense | DSD | tuned dense | DSD − tuned dense "
                  "(95% CI) | p (Holm) | verdict | DSD − dense at the same LR | p (Holm) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in cells:
            tuned, same = c["tuned"], c["same_lr"]
            edge = "*" if c["choice"]["dsd"]["at_grid_edge"] or \
                c["choice"]["dense"]["at_grid_edge"] else ""
            lrs = f"{c['choice']['dsd']['lr']:g} / {c['choice']['dense']['lr']:g}{edge}"
            scores = ["diverged"] * 2 if tuned["diverged"] else [
                f"{_shown_metric(tuned[f'{arm}_mean'], c['metric'])}" for arm in ARMS]
            lines.append(
                f"| {c['regime']} | {c['shown']} | {lrs} | {scores[0]} | {scores[1]} | "
                f"{_shown_diff(tuned, c['metric'])} | {tuned['p_holm']:.3f} | "
                f"{tuned['verdict']} | {_shown_diff(same, c['metric'])} | "
                f"{same['p_holm']:.3f} |")
        lines.append("")
    cells = result["cells"]
    lines.append(f"{result['seeds']} seeds per cell; Holm over {cells[0]['tuned']['family_size']} "
                 f"distinct cells per comparison; * a chosen LR at the edge of its grid, after "
                 f"widening it {BUDGETS[result['budget']]['extensions']} times (x2) that way.")
    return "\n".join(lines) + "\n"


def plots(result: dict) -> dict[str, bytes]:
    """{regime: PNG}: DSD minus the tuned dense baseline with its 95% interval against the
    knob, one panel per task."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pngs = {}
    for regime, label in result["regimes"].items():
        cells = [c for c in result["cells"] if c["regime"] == regime]
        tasks = list(dict.fromkeys(c["task"] for c in cells))
        figure = Figure(figsize=(4.2 * len(tasks), 3.4), layout="constrained")
        FigureCanvasAgg(figure)
        for axes, task in zip(np.atleast_1d(figure.subplots(1, len(tasks))), tasks):
            own = [c for c in cells if c["task"] == task]
            scale = 1 if own[0]["metric"] == "bpc" else 100
            for offset, (name, color) in enumerate((("tuned", "C0"), ("same_lr", "C7"))):
                xs, ys, errors = [], [], [[], []]
                for i, c in enumerate(own):
                    compared = c[name]
                    if compared["diverged"]:
                        continue
                    mean = scale * compared["paired"]["mean_diff"]
                    low, high = [scale * v for v in compared["paired"]["ci95"]] \
                        if compared["paired"]["ci95"] else (mean, mean)
                    xs.append(i + 0.12 * (offset - 0.5))
                    ys.append(mean)
                    errors[0].append(mean - low)
                    errors[1].append(high - mean)
                axes.errorbar(xs, ys, yerr=errors, fmt="o", color=color, capsize=3,
                              label="vs tuned dense" if name == "tuned" else "same LR")
            axes.axhline(0, color="0.3", linewidth=0.8)
            axes.set_xticks(range(len(own)), [c["shown"] for c in own])
            axes.set_xlabel(label)
            unit = "bits per character" if scale == 1 else "test accuracy, points"
            axes.set_ylabel(f"DSD − dense ({unit})")
            axes.set_title(task, fontsize=10)
            axes.legend(fontsize=7)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        pngs[regime] = buffer.getvalue()
    return pngs


def write_outputs(result: dict, out: Path, name: str) -> None:
    """out/NAME.json (every run), out/NAME.md (the table), out/NAME_REGIME.png (the plots)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(table(result))
    for regime, png in plots(result).items():
        (out / f"{name}_{regime}.png").write_bytes(png)


def parse_settings(items: list[str]) -> dict:
    """Run options from KEY=VALUE strings (TOML values), as --set gives them."""
    import tomllib

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            settings.update(tomllib.loads(f"{key.strip()} = {value}"))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"--set {item!r}: not a TOML value ({error})") from None
    return settings


def run_study_command(args) -> int:
    """`dsd study`: settings from --set KEY=VALUE, results into --out."""
    result = run_study(args.budget, tasks=args.tasks, regimes=args.regimes, seeds=args.seeds,
                       settings=parse_settings(args.set), work=args.work, jobs=args.jobs,
                       say=lambda line: print(line, file=sys.stderr))
    write_outputs(result, args.out, f"study_{args.budget}")
    print(table(result), end="")
    return 0
