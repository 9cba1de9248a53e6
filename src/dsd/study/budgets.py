"""What a study runs: the regimes (one knob each), the budgets (tasks, their base options,
regime values, learning-rate and regulariser grids) and the cells they expand to, each config
validated."""

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ConfigError, RunConfig

ARMS = ("dsd", "dense")
# Keys the study sets in every run itself, and how to choose them instead.
OWNED = {"task": "give --tasks", "seed": "give --seeds: the runs take seeds 0 to N-1",
         "baseline": "every run trains the baseline: the study pairs with it",
         "lr": "every arm picks its own from the budget's grid on validation",
         "dropout": "every arm picks its own from the budget's regulariser grid on validation",
         "weight_decay": "every arm picks its own from the budget's regulariser grid on "
                         "validation",
         "evaluate_test": "runs never read the test split; the study evaluates it after the "
                          "learning rates are chosen"}


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
    "pattern": Regime("sparse phases' pattern at 50% sparsity",
                      lambda v, base: {"pattern": v, "sparsity": 0.5},
                      lambda v: v or "unstructured"),
    "model": Regime("model (auto: the task's own)", lambda v, base: {"model": v}),
}


UNREGULARISED = (0.0, 0.0)  # (dropout, weight_decay): the same-LR comparison's regulariser


@dataclass(frozen=True)
class TaskStudy:
    """What a budget runs on one task: base run options, the regimes' values, per optimizer
    the learning-rate grid with its reference rate (the same-LR comparison), and the
    regularisers, (dropout, weight_decay) pairs, that every rate is tried with."""
    base: dict
    regimes: dict
    lrs: dict = field(default_factory=lambda: {
        "adam": ((5e-4, 1e-3, 2e-3, 4e-3), 2e-3), "sgd": ((0.0125, 0.025, 0.05, 0.1), 0.05)})
    regularisers: tuple = (UNREGULARISED,)

    def __post_init__(self):  # the same-LR comparison runs at (reference rate, unregularised)
        if UNREGULARISED not in self.regularisers:
            raise ValueError(f"a study's regularisers must include {UNREGULARISED} "
                             f"(dropout, weight_decay), got {self.regularisers}")
        for optimizer, (grid, reference) in self.lrs.items():
            if reference not in grid:
                raise ValueError(f"the reference rate {reference} of {optimizer} is not in its "
                                 f"grid {grid}")


def regulariser_grid(dropouts, weight_decays) -> tuple:
    """Every (dropout, weight_decay) pair: the regularisers a cell tries at each rate."""
    return tuple(itertools.product(dropouts, weight_decays))


_CLASSIFICATION_REGIMES = {
    "label_noise": (0.0, 0.2, 0.4), "width": (100, 300, 1000),
    "first_phase": (3, 12, 48), "sparsity": (0.3, 0.5, 0.7, 0.9), "iterations": (1, 2),
    "optimizer": ("adam", "sgd")}
_SAVES = {"checkpoint_every": 100}  # a resumable checkpoint at the branch and the end only
BUDGETS = {
    # Sized for a test: a few seconds on one core.
    "quick": {"seeds": 2, "extensions": 1, "tasks": {"digits": TaskStudy(
        {"phases": [2, 2, 2], "mlp_hidden": [32, 16], "optimizer": "adamw"},
        {"sparsity": (0.5, 0.9), "label_noise": (0.0, 0.3), "pattern": ("", "2:4")},
        {"adamw": ((1e-3, 4e-3), 4e-3)}, (UNREGULARISED, (0.2, 0.1)))}},
    # The study of docs/study.md: about 1.5 hours on 2 CPU cores with --jobs 2.
    "full": {"seeds": 8, "extensions": 2, "tasks": {
        "mnist1d": TaskStudy(_SAVES, {**_CLASSIFICATION_REGIMES,
                                      "train_examples": (250, 500, 1000, 0)}),
        "digits": TaskStudy(_SAVES, {**_CLASSIFICATION_REGIMES,
                                     "train_examples": (250, 500, 0)}),
        "text": TaskStudy({**_SAVES, "phases": [5, 5, 5]}, {"sparsity": (0.3, 0.5)},
                          {"adam": ((1e-3, 2e-3, 4e-3), 2e-3)}),
    }},
    # Unstructured 50% against 2:4 (the same share), the classification tasks, as "full" runs.
    "pattern": {"seeds": 8, "extensions": 2, "tasks": {
        task: TaskStudy(_SAVES, {"pattern": ("", "2:4")}) for task in ("mnist1d", "digits")}},
    # Is DSD more than a regulariser? Both arms also choose dropout and AdamW's decoupled
    # weight decay, in the regimes where that may matter: MNIST-1D's MLP (and its CNN) and
    # the text LSTM; about 1 h 45 min on 2 CPU cores with --jobs 2 (docs/study.md).
    "regularised": {"seeds": 6, "extensions": 2, "tasks": {
        "mnist1d": TaskStudy({**_SAVES, "optimizer": "adamw"},
                             {"sparsity": (0.5, 0.7, 0.9), "label_noise": (0.0, 0.2, 0.4),
                              "pattern": ("", "2:4"), "model": ("auto", "cnn"),
                              "width": (100, 300, 1000), "train_examples": (250, 1000, 0)},
                             {"adamw": ((1e-3, 2e-3, 4e-3, 8e-3), 2e-3)},
                             regulariser_grid((0.0, 0.1, 0.2, 0.3), (0.0, 0.01, 0.1))),
        "text": TaskStudy({**_SAVES, "phases": [5, 5, 5], "optimizer": "adamw"},
                          {"sparsity": (0.5,)}, {"adamw": ((4e-3, 8e-3, 1.6e-2), 8e-3)},
                          regulariser_grid((0.0, 0.2), (0.0, 0.1))),
    }},
}


def digest(mapping: dict) -> str:
    """A short hash of a config's options: what names a run directory and a cell."""
    return hashlib.sha1(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Cell:
    """One task with one knob at one value: `grid` holds its (lr, dropout, weight_decay)
    points, in the order ties go by (regulariser as the budget lists them, then rate)."""
    task: str
    regime: str
    value: object
    config: RunConfig  # the cell's options; lr, dropout, weight_decay and seed vary over runs
    grid: tuple
    reference_lr: float
    higher_is_better: bool
    metric: str  # "acc" or "bpc"

    def key(self) -> str:  # cells with equal configs share runs and count once in the family
        return digest(self.config.to_dict())

    def run_config(self, point: tuple, seed: int) -> RunConfig:
        """The config of the run at grid point (lr, dropout, weight_decay) and `seed`."""
        lr, dropout, weight_decay = point
        return RunConfig.from_mapping({"lr": lr, "dropout": dropout,
                                       "weight_decay": weight_decay, "seed": seed},
                                      base=self.config)


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
                lrs, reference = study.lrs[config.optimizer]
                grid = tuple((lr, *regulariser) for regulariser in study.regularisers
                             for lr in lrs)
                text = task == "text"
                cell = Cell(task, regime, value, config, grid, reference,
                            higher_is_better=not text, metric="bpc" if text else "acc")
                for point in grid:  # e.g. a dropout the model has no use for fails here
                    cell.run_config(point, 0)
                cells.append(cell)
    if regimes is not None:
        known = {r for task in tasks for r in spec[task].regimes}
        for regime in regimes:
            if regime not in known:
                raise ValueError(f"--regimes: {regime!r} is not a regime of budget {budget} "
                                 f"on {', '.join(tasks)}; choose from {', '.join(sorted(known))}")
    return cells
