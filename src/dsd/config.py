"""Every choice of a `dsd train` run, in one validated dataclass.

Sources, later ones winning: the defaults below (the backend's is $DSD_BACKEND, else auto), a
TOML config file, command-line flags. A run directory keeps its config as config.toml, so
`dsd train --config RUN/config.toml` repeats it.
"""

import difflib
import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .models import MODELS
from .plan import SCOPES, Plan
from .tasks import TASKS

OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "triton", "cpp", "torch")


class ConfigError(ValueError):
    """A bad value of one config key. `detail` is the message after the value's name, so the
    command line can name the flag instead (`labelled`)."""

    def __init__(self, key: str, detail: str, label: str | None = None):
        super().__init__(f"{label or key}{detail}")
        self.key, self.detail = key, detail

    def labelled(self, label: str) -> "ConfigError":
        return ConfigError(self.key, self.detail, label)


def _option(default, help, choices=None):
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else \
        {"default": default}
    return field(metadata={"help": help, "choices": choices}, **kwargs)


def _backend_from_env() -> str:
    """DSD_BACKEND, else auto. The config records the backend a run used, so `--resume`
    takes the same kernels whatever the variable says then."""
    name = os.environ.get("DSD_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"DSD_BACKEND={name!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS)}")
    return name


# Accepted values of the numeric keys. NaN fails every comparison, so it is refused too.
_RANGES = {
    "sparsity": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lr": (lambda v: 0 < v < math.inf, "a number > 0"),
    "redense_lr_factor": (lambda v: 0 < v < math.inf, "a number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "rnn_hidden": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 1, "an integer >= 1"),
    "threads": (lambda v: v >= 0, "an integer >= 0"),
    "mnist1d_samples": (lambda v: v >= 100, "an integer >= 100"),
}


@dataclass(frozen=True)
class RunConfig:
    task: str = _option("mnist1d", "embedded task (generated or shipped, no download)", TASKS)
    model: str = _option("mlp", "mlp (LeNet-300-100), cnn, gru or lstm", MODELS)
    phases: list[int] = _option([12, 12, 12], "epochs of each phase, alternating dense and "
                                "sparse from dense: 12,12,12 is DSD, 8,8,8,8,8 is DSDSD")
    sparsity: float = _option(0.5, "fraction of each prunable tensor pruned in sparse phases")
    scope: str = _option("layer", "prune per tensor (layer, the paper) or ranked over all "
                         "prunable tensors together (global)", SCOPES)
    include: list[str] = _option([], "prune exactly the parameters matching these fnmatch "
                                 "patterns (default: Linear/Conv/RNN/Embedding weights)")
    exclude: list[str] = _option([], "never prune parameters matching these patterns")
    redense_lr_factor: float = _option(0.1, "learning-rate factor applied at each re-dense")
    optimizer: str = _option("adam", "optimizer (run as its dsd_kernels masked version)",
                             OPTIMIZERS)
    lr: float = _option(2e-3, "learning rate of the first dense phase")
    momentum: float = _option(0.9, "SGD momentum (sgd only)")
    weight_decay: float = _option(0.0, "weight decay (decoupled for adamw)")
    batch_size: int = _option(64, "training batch size")
    seed: int = _option(0, "seed of the initialisation and the batch order")
    baseline: bool = _option(False, "also train densely for the same epochs with the same "
                             "LR drop, branching from the end of the first dense phase")
    val_fraction: float = _option(0.1, "share of the training set held out for validation")
    mnist1d_samples: int = _option(5000, "examples MNIST-1D generates (80%% train, 20%% test)")
    mlp_hidden: list[int] = _option([300, 100], "hidden widths of the MLP")
    cnn_channels: list[int] = _option([32, 32], "channels of the CNN's stride-2 convolutions")
    rnn_hidden: int = _option(64, "hidden size of the GRU/LSTM")
    dropout: float = _option(0.0, "dropout on the MLP's hidden activations, or before the "
                             "classifier of the CNN and RNN")
    device: str = _option("auto", "where to train (auto: cuda if available)", DEVICES)
    backend: str = field(default_factory=_backend_from_env, metadata={
        "help": "dsd_kernels backend (auto: the fastest that loads)", "choices": BACKENDS,
        "shown_default": "$DSD_BACKEND, else auto"})
    checkpoint_every: int = _option(1, "save a resumable checkpoint every N epochs")
    threads: int = _option(1, "CPU threads for torch (0: torch's default); these small "
                           "models run fastest on one")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; choose one of "
                                 f"{', '.join(f.metadata['choices'])}")
        self._check_ranges()
        self.plan()  # the plan validates phases, sparsity and patterns

    def _check_ranges(self):
        if not self.phases:
            raise ConfigError("phases", " is empty: give the epochs of at least one phase")
        for n in self.phases:
            if n < 1:
                raise ConfigError("phases", f": every phase needs at least 1 epoch, got {n}")
        for name, (accepts, what) in _RANGES.items():
            if not accepts(getattr(self, name)):
                raise ConfigError(name, f" must be {what}, got {getattr(self, name)!r}")
        for name in ("mlp_hidden", "cnn_channels"):
            widths = getattr(self, name)
            if not widths or any(w < 1 for w in widths):
                raise ConfigError(name, f" needs one or more positive widths, got {widths}")

    def plan(self) -> Plan:
        return Plan.from_lengths(self.phases, sparsity=self.sparsity,
                                 redense_lr_factor=self.redense_lr_factor, scope=self.scope,
                                 include=self.include, exclude=self.exclude)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: dict, *, base: "RunConfig | None" = None,
                     source: str = "config") -> "RunConfig":
        """A config from `values` over `base` (default: the defaults); unknown keys are errors."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{source}: unknown key {key!r}{hint} (known keys: "
                                 f"{', '.join(known)})")
        # Not cls().to_dict(): that would evaluate every default, and an invalid DSD_BACKEND
        # must not stop a config that names its backend.
        merged = base.to_dict() if base else {}
        merged.update(values)
        return cls(**merged)

    @classmethod
    def from_toml(cls, path, *, base: "RunConfig | None" = None) -> "RunConfig":
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except OSError as error:
            raise ValueError(f"cannot read config file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path} is not valid TOML: {error}") from None
        try:
            return cls.from_mapping(values, base=base, source=str(path))
        except ConfigError as error:
            raise error.labelled(f"{path}: {error.key}") from None

    def to_toml(self) -> str:
        """TOML that `from_toml` reads back to an equal config (JSON escapes are valid TOML)."""
        lines = []
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def _check_type(name: str, value, annotation) -> None:
    """Strict types: a TOML typo such as sparsity = "0.5" is an error, not a silent cast."""
    origin = getattr(annotation, "__origin__", annotation)
    if origin is list:
        (item,) = annotation.__args__
        if not isinstance(value, list) or not all(_is(v, item) for v in value):
            raise ConfigError(name, f" must be a list of {item.__name__}, got {value!r}")
    elif not _is(value, origin):
        raise ConfigError(name, f" must be {origin.__name__}, got {value!r}")


def _is(value, kind) -> bool:
    if kind is float:  # NaN and inf are floats: the key's range refuses them, naming it
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
