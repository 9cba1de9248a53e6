"""`dsd train`: the run (recipe.py) and what it is made of, one job per module:

    recipe.py      the run: setup, each arm's epoch loop, the outputs (orchestration only)
    prepare.py     data, --init file and model checked before anything is written
    arms.py        an arm: model, masked optimizer, DSD runner, gradient scaler
    epoch.py       one training epoch and the clock of its optimizer steps
    evaluate.py    loss and accuracy during a run and of a finished run's model
    compute.py     the device, autocast, inputs on the device
    checkpoints.py the checkpoint format: capture, read checked, restore, RNG states
    run_dir.py     the run directory: default name, config, lock
    init_file.py   reading and loading --init files
    dry_run.py     the --dry-run report
    outputs.py     metrics.jsonl, summary.json/.txt, sparsity.json, plot.png
    report.py      the summary, its text table and the plot
    errors.py      RunError, DivergedError, RunDirError
"""

from .arms import model_label
from .dry_run import dry_run
from .errors import DivergedError, RunDirError, RunError
from .evaluate import evaluate_saved
from .prepare import prepare
from .recipe import TIMING_KEYS, train
from .run_dir import default_run_dir, load_config

__all__ = ["train", "prepare", "dry_run", "evaluate_saved", "load_config", "default_run_dir",
           "model_label", "RunError", "DivergedError", "RunDirError", "TIMING_KEYS"]
