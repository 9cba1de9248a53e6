"""A study's outputs: the markdown table, one plot per regime, and the files holding them."""

import json
from pathlib import Path

import numpy as np

from .budgets import ARMS, BUDGETS


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

    # Here, not at the top: matplotlib takes a second to import and only the plots need it.
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
