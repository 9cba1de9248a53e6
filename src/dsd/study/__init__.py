"""Where does DSD help? DSD against a tuned dense baseline, one knob at a time, paired over seeds.

A cell is one task with one knob (a regime) at one value. Every seed trains both arms at every
point of a grid of learning rates and regularisers (dropout, weight decay) with the test split
switched off; each arm picks its point on validation, and only then are the chosen models
tested; a paired t-test per cell, with Holm's correction over the study's cells (design.md,
"The study"; results in docs/study.md).

budgets.py: the regimes, budgets and cells; run.py: training, choosing and testing;
stats.py: the tests and corrections; report.py: the table, plots and files.
"""

from .budgets import BUDGETS, REGIMES, Cell, Regime, TaskStudy, cells_of, regulariser_grid
from .report import plots, table, write_outputs
from .stats import benjamini_hochberg, holm, paired_test

_RUN_NAMES = ("choose", "run_study", "train_one")

__all__ = ["BUDGETS", "REGIMES", "Cell", "Regime", "TaskStudy", "benjamini_hochberg",
           "cells_of", "holm", "paired_test", "plots", "regulariser_grid", "table",
           "write_outputs", *_RUN_NAMES]


def __getattr__(name: str):
    # run.py imports the trainer; `dsd --help` reads BUDGETS from here without paying for it.
    if name in _RUN_NAMES:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
