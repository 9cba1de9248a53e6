"""Every choice of a `dsd train` run, in one validated dataclass.

Sources, later ones winning: the defaults below, a TOML config file, command-line flags. A run
directory keeps its config as config.toml, so `dsd train --config RUN/config.toml` repeats it.
"""

import difflib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .models import MODELS
from .plan import SCOPES, Plan
from .tasks import TASKS

OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "triton", "cpp", "torch")


def _option(default, help, choices=None):
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else \
        {"default": default}
    return field(metadata={"help": help, "choices": choices}, **kwargs)


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
    backend: str = _option("auto", "dsd_kernels backend (auto: the fastest that loads)", BACKENDS)
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
            raise ValueError("phases is empty: give the epochs of at least one phase")
        if any(n < 1 for n in self.phases):
            raise ValueError(f"every phase needs at least 1 epoch, got phases={self.phases}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("lr", "redense_lr_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("batch_size", "rnn_hidden", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.mnist1d_samples < 100:
            raise ValueError(f"mnist1d_samples must be >= 100, got {self.mnist1d_samples}")
        for name in ("mlp_hidden", "cnn_channels"):
            widths = getattr(self, name)
            if not widths or any(w < 1 for w in widths):
                raise ValueError(f"{name} needs one or more positive widths, got {widths}")

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
        merged = (base or cls()).to_dict()
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
        return cls.from_mapping(values, base=base, source=str(path))

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
            raise ValueError(f"{name} must be a list of {item.__name__}, got {value!r}")
    elif not _is(value, origin):
        raise ValueError(f"{name} must be {origin.__name__}, got {value!r}")


def _is(value, kind) -> bool:
    if kind is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
