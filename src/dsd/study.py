"""The accuracy study: DSD against its equal-budget dense baseline over seeds, paired.

Each seed gives both arms the same initialisation, first dense phase, batch order and LR drop
(`dsd train --baseline`), so the per-seed difference cancels most of the seed noise; a paired
t-test says whether the mean difference stands out from what is left.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import stats

from .config import ConfigError, RunConfig
from .trainer import train

# Keys the study sets in every run itself, and how to choose them instead.
OWNED = {"task": "give --tasks", "model": "give --models",
         "seed": "give --seeds: the runs take seeds 0 to N-1",
         "baseline": "every run trains the baseline: the study pairs with it"}


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


def _run_dir(work: Path, config: RunConfig) -> Path:
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    return work / f"{config.task}-{config.model}-s{config.seed}-{digest[:8]}"


def run_study(tasks, models, seeds: int, settings: dict, work: Path, *, say=print) -> dict:
    """Every task x model x seed as a paired DSD + baseline run (resumable in `work`)."""
    _refuse_owned(settings)
    cells = []
    for task in tasks:
        for model in models:
            runs = []
            for seed in range(seeds):
                config = RunConfig.from_mapping(
                    {**settings, "task": task, "model": model, "seed": seed, "baseline": True})
                began = time.perf_counter()
                summary = train(config, _run_dir(work, config), quiet=True)
                arms = summary["arms"]
                runs.append({
                    "seed": seed,
                    "dsd_test_acc": arms["dsd"]["final"]["test_acc"],
                    "dense_test_acc": arms["baseline"]["final"]["test_acc"],
                    "dsd_val_acc": arms["dsd"]["final"]["val_acc"],
                    "dense_val_acc": arms["baseline"]["final"]["val_acc"],
                    "first_dense_phase_test_acc": arms["dsd"]["phase_end"][0]["test_acc"],
                    "sparse_phase_test_acc": arms["dsd"]["phase_end"][1]["test_acc"],
                    "train_seconds": summary["train_seconds"]})
                say(f"{task}/{model} seed {seed}: DSD {runs[-1]['dsd_test_acc']:.2%}, dense "
                    f"{runs[-1]['dense_test_acc']:.2%} ({time.perf_counter() - began:.0f} s)")
            dsd = [r["dsd_test_acc"] for r in runs]
            dense = [r["dense_test_acc"] for r in runs]
            cells.append({"task": task, "model": model, "config": config.to_dict(),
                          "dsd_mean": float(np.mean(dsd)), "dsd_sd": float(np.std(dsd, ddof=1)),
                          "dense_mean": float(np.mean(dense)),
                          "dense_sd": float(np.std(dense, ddof=1)),
                          "paired": paired_test(dsd, dense), "runs": runs})
    return {"settings": settings, "seeds": seeds, "cells": cells}


def _refuse_owned(settings: dict) -> None:
    for key in settings:
        if key in OWNED:
            raise ValueError(f"--set {key}: the study sets {key} itself ({OWNED[key]})")


def table(result: dict) -> str:
    """Markdown table of a study: accuracies in %, differences in points."""
    lines = ["| task | model | DSD test acc | dense test acc | paired diff (95% CI) | p | "
             "outside seed noise? |", "|---|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        paired = cell["paired"]
        diff = f"{100 * paired['mean_diff']:+.2f}"
        if paired["p_value"] is None:
            diff, p, verdict = f"{diff} on every seed", "n/a", "undefined (no spread)"
        else:
            low, high = (100 * x for x in paired["ci95"])
            diff += f" ({low:+.2f}, {high:+.2f})"
            p, verdict = f"{paired['p_value']:.3f}", "yes" if paired["outside_noise"] else "no"
        lines.append(
            f"| {cell['task']} | {cell['model']} | {100 * cell['dsd_mean']:.2f} ± "
            f"{100 * cell['dsd_sd']:.2f} | {100 * cell['dense_mean']:.2f} ± "
            f"{100 * cell['dense_sd']:.2f} | {diff} | {p} | {verdict} |")
    return "\n".join(lines) + "\n"


def run_study_command(args) -> int:
    """`dsd study`: settings from --set KEY=VALUE (TOML values), results to --out."""
    import tomllib

    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            settings.update(tomllib.loads(f"{key.strip()} = {value}"))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"--set {item!r}: not a TOML value ({error})") from None
    for task in args.tasks:  # fail before any run starts
        for model in args.models:
            try:
                RunConfig.from_mapping({**settings, "task": task, "model": model},
                                       source="--set")
            except ConfigError as error:
                raise error.labelled(f"--set {error.key}") from None
    if args.seeds < 2:
        raise ValueError("--seeds must be at least 2 for a paired test")
    result = run_study(args.tasks, args.models, args.seeds, settings, args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result), end="")
    return 0
