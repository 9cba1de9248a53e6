"""The files a run writes besides its checkpoints: metrics.jsonl as it goes, then
sparsity.json, summary.json/.txt and plot.png."""

import json
from pathlib import Path

from .. import atomic_io
from . import report


def append_metrics(run_dir: Path, row: dict) -> None:
    path = run_dir / "metrics.jsonl"
    with atomic_io.writing(path), open(path, "a") as file:
        file.write(json.dumps(row) + "\n")


def rewrite_metrics(run_dir: Path, rows: list[dict]) -> None:
    """metrics.jsonl as `rows`: rows written after the checkpoint they come from are dropped,
    rows a kill kept from being written are restored."""
    atomic_io.save_text("".join(json.dumps(row) + "\n" for row in rows),
                        run_dir / "metrics.jsonl")


def write_final(run_dir: Path, summary: dict, sparsity: dict, plot_png: bytes) -> None:
    atomic_io.save_json(sparsity, run_dir / "sparsity.json")
    atomic_io.save_json(summary, run_dir / "summary.json")
    atomic_io.save_text(report.table(summary), run_dir / "summary.txt")
    atomic_io.save_bytes(plot_png, run_dir / "plot.png")
