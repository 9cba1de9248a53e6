"""What a run reports: its line per epoch, then the summary (dict and text table) and the
plot."""

import io
from pathlib import Path

import dsd_kernels

_FINAL_KEYS = ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "sparsity")
_BPC_KEYS = ("train_bpc", "val_bpc", "test_bpc")  # text tasks


def _shown_split(row: dict) -> str:
    """The split a run reports: test, or validation when the run never read the test split."""
    return "test" if "test_loss" in row else "val"


def epoch_line(row: dict, total: int) -> str:
    """The progress line of one metrics row: accuracy, or bits per character for text."""
    text = "val_bpc" in row
    scores = "".join(f"  {split} bpc {row[f'{split}_bpc']:.4f}" if text
                     else f"  {split} acc {row[f'{split}_acc']:.2%}"
                     for split in ("val", "test") if f"{split}_loss" in row)
    return (f"{row['arm']:8s} epoch {row['epoch']:3d}/{total}  {row['kind']:6s} "
            f"lr {row['lr']:.2g}  train loss {row['train_loss']:.4f}{scores}")


def _phase_name(plan, index: int) -> str:
    phase = plan.phases[index]
    if phase.kind == "sparse":
        if phase.masks == "zeros":
            return "sparse, zeros kept"
        return f"sparse {phase.pattern or f'{phase.sparsity:.0%}'}"
    return "re-dense" if index > 0 else "dense"


def full_history(history: dict, arm: str, branch_epoch: int) -> list[dict]:
    """An arm's rows for every epoch: the baseline shares the DSD rows before the branch."""
    if arm == "dsd":
        return history["dsd"]
    return [row for row in history["dsd"] if row["epoch"] <= branch_epoch] + history[arm]


def summary(config, plan, history: dict, sparsity: dict, branch_epoch: int, seconds: float,
            run_dir: Path, model: str) -> dict:
    """`model`: the model's name (the task's default resolved, or the factory)."""
    phases = [{"phase": i + 1, "name": _phase_name(plan, i), "kind": p.kind,
               "first_epoch": start + 1, "last_epoch": start + p.length,
               "sparsity": p.sparsity, "lr": config.lr * p.lr_scale}
              for i, (p, start) in enumerate(zip(plan.phases, plan.starts))]
    arms = {}
    for arm in history:
        rows = {row["epoch"]: row for row in full_history(history, arm, branch_epoch)}
        last = rows[plan.total]  # without the test split (evaluate_test false): no test keys
        keys = [key for key in _FINAL_KEYS + _BPC_KEYS if key in last]
        own = history[arm]  # the epochs this arm trained itself
        arms[arm] = {
            "final": {key: last[key] for key in keys},
            "phase_end": [{key: rows[phase["last_epoch"]][key] for key in keys}
                          for phase in phases],
            "examples_per_second": _median([row["examples_per_second"] for row in own]),
            "optimizer_share": _median([row["optimizer_share"] for row in own]),
            "layer_sparsity_at_phase_end": [record["end"] for record in sparsity[arm]],
            "model_file": str(run_dir / ("model.pt" if arm == "dsd" else "baseline_model.pt")),
        }
    result = {"config": config.to_dict(), "model": model, "run_dir": str(run_dir),
              "phases": phases,
              "arms": arms, "branch_epoch": branch_epoch if "baseline" in arms else None,
              "train_seconds": round(seconds, 2),
              "kernels": dsd_kernels.selected_backends()}
    if "baseline" in arms:
        for key in ("test_acc", "test_bpc"):
            if key in arms["dsd"]["final"]:
                result[f"{key}_difference"] = (arms["dsd"]["final"][key]
                                               - arms["baseline"]["final"][key])
    return result


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def table(result: dict) -> str:
    """The end-of-run text: per-phase accuracy of each arm, per-layer sparsity, the verdict."""
    config = result["config"]
    arms = result["arms"]
    split = _shown_split(arms["dsd"]["final"])
    text = f"{split}_bpc" in arms["dsd"]["final"]
    metric, name = (f"{split}_bpc", "bpc") if text else (f"{split}_acc", "acc")
    shown = (lambda v: f"{v:.4f}") if text else (lambda v: f"{v:.2%}")
    lines = [f"DSD on {config['task']} / {result['model']}, seed {config['seed']}: phases "
             f"{','.join(map(str, config['phases']))} epochs, "
             + ("the --init model's zeros kept" if config.get("masks") == "zeros" else
                f"pattern {config['pattern']} (sparsity {config['sparsity']:.0%})"
                if config.get("pattern") else  # summaries from before --pattern lack the key
                f"sparsity {config['sparsity']:.0%} ({config['scope']} scope)")
             + f", {config['optimizer']} lr {config['lr']:g}"]
    header = ["phase", "epochs", "lr", f"DSD {split} {name}", f"DSD {split} loss"]
    if "baseline" in arms:
        header += [f"dense {split} {name}", f"dense {split} loss"]
    rows = []
    for i, phase in enumerate(result["phases"]):
        epochs = (str(phase["first_epoch"]) if phase["first_epoch"] == phase["last_epoch"]
                  else f"{phase['first_epoch']}-{phase['last_epoch']}")
        cells = [f"{phase['phase']} {phase['name']}", epochs, f"{phase['lr']:.3g}"]
        for arm in arms:
            end = arms[arm]["phase_end"][i]
            cells += [shown(end[metric]), f"{end[f'{split}_loss']:.4f}"]
        rows.append(cells)
    lines += aligned([header] + rows)
    final = arms["dsd"]["final"]
    what = "bits per character" if text else "accuracy"
    if "baseline" in arms:
        dense = arms["baseline"]["final"]
        difference = final[metric] - dense[metric]
        gap = f"{difference:+.4f} bpc" if text else f"{100 * difference:+.2f} points"
        lines.append(f"final {split} {what}: DSD {shown(final[metric])}, dense baseline "
                     f"{shown(dense[metric])} ({gap}; one seed: `dsd study` compares over seeds "
                     "against a tuned baseline)")
    else:
        lines.append(f"final {split} {what}: DSD {shown(final[metric])} (add --baseline for the "
                     "equal-budget dense run)")
    speed = arms["dsd"]["examples_per_second"]
    if speed is not None:
        lines.append(f"training speed (DSD, median epoch): {speed:,.0f} examples/s, the masked "
                     f"optimizer's step {arms['dsd']['optimizer_share']:.1%} of the time")
    layers = arms["dsd"]["layer_sparsity_at_phase_end"]
    if layers:
        names = list(layers[0])
        lines.append("zero weights per prunable layer at the end of each phase (DSD):")
        grid = [["layer"] + [f"phase {p['phase']}" for p in result["phases"]]]
        grid += [[name] + [f"{record[name]:.1%}" for record in layers] for name in names]
        lines += aligned(grid)
    lines.append(f"run directory: {result['run_dir']} (plot.png, metrics.jsonl, model.pt)")
    return "\n".join(lines) + "\n"


def aligned(grid: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in grid]


def plot(plan, history: dict, *, title: str, branch_epoch: int) -> bytes:
    """PNG of loss and accuracy (bits per character for text) per epoch, phases shaded and
    labelled; the baseline dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only a finished run plots
    from matplotlib.figure import Figure

    split = _shown_split(history["dsd"][-1])
    text = f"{split}_bpc" in history["dsd"][-1]
    metric, scale, metric_label = (f"{split}_bpc", 1, "bits per character") if text else \
        (f"{split}_acc", 100, "accuracy (%)")
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, acc_axes = figure.subplots(1, 2)
    styles = {"dsd": ("C0", "-", "DSD"), "baseline": ("C1", "--", "dense baseline")}
    for arm, rows in history.items():
        rows = full_history(history, arm, branch_epoch)
        if arm != "dsd":  # draw the baseline from the branch point on
            rows = [row for row in rows if row["epoch"] >= branch_epoch]
        color, line, label = styles[arm]
        epochs = [row["epoch"] for row in rows]
        loss_axes.plot(epochs, [row["train_loss"] for row in rows], color=color, linestyle=line,
                       alpha=0.5, label=f"{label} train")
        loss_axes.plot(epochs, [row[f"{split}_loss"] for row in rows], color=color,
                       linestyle=line, label=f"{label} {split}")
        acc_axes.plot(epochs, [scale * row[metric] for row in rows], color=color,
                      linestyle=line, label=f"{label} {split}")
    for axes, ylabel in ((loss_axes, "cross-entropy loss"), (acc_axes, metric_label)):
        for i, (phase, start) in enumerate(zip(plan.phases, plan.starts)):
            if phase.kind == "sparse":
                axes.axvspan(start + 0.5, start + phase.length + 0.5, color="0.85", zorder=0)
            if i:
                axes.axvline(start + 0.5, color="0.4", linewidth=0.8, linestyle=":")
            axes.text(start + 0.5 + phase.length / 2, 1.01, _phase_name(plan, i),
                      transform=axes.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.legend(fontsize=8)
    loss_axes.set_yscale("log")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
