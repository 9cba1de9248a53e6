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


def _shown_choice(chosen: dict) -> str:
    # A result written before regularisers were tuned holds the rate only: it ran unregularised.
    text = f"{chosen['lr']:g} / {chosen.get('dropout', 0):g} / {chosen.get('weight_decay', 0):g}"
    return text + ("*" if chosen["at_grid_edge"] else "")


def _shown_confirmation(again: dict | None, metric: str) -> str:
    if again is None:
        return "| | | |"
    verdict = "confirmed" if again["confirmed"] else "not confirmed"
    return f"| {_shown_diff(again, metric)} | {again['p_holm']:.3f} | {verdict} |"


def table(result: dict) -> str:
    """Markdown: per task and regime, each arm's chosen LR, dropout and weight decay and its
    test score, the tuned difference with its 95% interval, Holm-adjusted p and verdict, the
    same on fresh seeds where the cell was found (the confirmation), and the same-LR
    difference."""
    lines = []
    for task in dict.fromkeys(c["task"] for c in result["cells"]):
        cells = [c for c in result["cells"] if c["task"] == task]
        unit = "bits per character, lower is better" if cells[0]["metric"] == "bpc" \
            else "test accuracy %"
        lines += [f"**{task}** ({unit}; differences DSD − dense)", "",
                  "| regime | value | DSD: LR / dropout / weight decay | dense: LR / dropout / "
                  "weight decay | DSD | tuned dense | DSD − tuned dense (95% CI) | p (Holm) | "
                  "verdict | fresh seeds: DSD − tuned dense (95% CI) | p (Holm) | confirmed | "
                  "DSD − dense at the same LR | p (Holm) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in cells:
            tuned, same = c["tuned"], c["same_lr"]
            scores = ["diverged"] * 2 if tuned["diverged"] else [
                f"{_shown_metric(tuned[f'{arm}_mean'], c['metric'])}" for arm in ARMS]
            lines.append(
                f"| {c['regime']} | {c['shown']} | {_shown_choice(c['choice']['dsd'])} | "
                f"{_shown_choice(c['choice']['dense'])} | {scores[0]} | {scores[1]} | "
                f"{_shown_diff(tuned, c['metric'])} | {tuned['p_holm']:.3f} | "
                f"{tuned['verdict']} {_shown_confirmation(c.get('confirmation'), c['metric'])} "
                f"{_shown_diff(same, c['metric'])} | {same['p_holm']:.3f} |")
        lines.append("")
    cells = result["cells"]
    lines.append(f"{result['seeds']} seeds per cell; Holm over {cells[0]['tuned']['family_size']} "
                 f"distinct cells per comparison; * a chosen LR at the edge of those tried with "
                 f"its regulariser, after widening them "
                 f"{BUDGETS[result['budget']]['extensions']} times (x2) that way.")
    if "confirmation_seeds" in result:
        low, high = result["confirmation_seeds"]
        found = {c["key"] for c in cells if c["confirmation"] is not None}
        lines.append(f"Fresh seeds {low} to {high - 1} for each of the {len(found)} distinct "
                     f"cells with p (Holm) < 0.05, at the points chosen, Holm over those cells; "
                     f"confirmed: outside the noise after that, the same way.")
    return "\n".join(lines) + "\n"


def plots(result: dict) -> dict[str, bytes]:
    """{regime: PNG}: DSD minus the tuned dense baseline with its 95% interval against the
    knob (on the fresh seeds too, where a cell was confirmed or not, and at the same LR), one
    panel per task."""
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
            series = (("tuned", "C0", "vs tuned dense"), ("confirmation", "C3", "fresh seeds"),
                      ("same_lr", "C7", "same LR"))
            for offset, (name, color, legend) in enumerate(series):
                xs, ys, errors = [], [], [[], []]
                for i, c in enumerate(own):
                    compared = c.get(name)
                    if compared is None or compared["diverged"]:
                        continue
                    mean = scale * compared["paired"]["mean_diff"]
                    low, high = [scale * v for v in compared["paired"]["ci95"]] \
                        if compared["paired"]["ci95"] else (mean, mean)
                    xs.append(i + 0.12 * (offset - 1))
                    ys.append(mean)
                    errors[0].append(mean - low)
                    errors[1].append(high - mean)
                if xs:
                    axes.errorbar(xs, ys, yerr=errors, fmt="o", color=color, capsize=3,
                                  label=legend)
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
