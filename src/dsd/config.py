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

import dsd_kernels
from dsd_kernels import _checks

from .data import TASKS
from .models import MODELS, is_factory
from .optimizers import canonical_name, optimizer_class, run_kwargs
from .plan import KINDS, MASKS, Plan

DEVICES = ("auto", "cpu", "cuda")
AMP = ("off", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad value of one config key. `detail` is the message after the value's name, so the
    command line can name the flag instead (`labelled`)."""

    def __init__(self, key: str, detail: str, label: str | None = None):
        super().__init__(f"{label or key}{detail}")
        self.key, self.detail = key, detail

    def labelled(self, label: str) -> "ConfigError":
        return ConfigError(self.key, self.detail, label)


def _option(default, help, choices=None):
    mutable = isinstance(default, (list, dict))
    kwargs = {"default_factory": lambda: type(default)(default)} if mutable else \
        {"default": default}
    return field(metadata={"help": help, "choices": choices}, **kwargs)


_CPUS = os.cpu_count() or 1
# Every integer key, and every item of an integer list, at most this: torch and NumPy take
# sizes and counts as int64, and a larger one fails there naming no key.
_INT64_MAX = 2**63 - 1

# Accepted values of the numeric keys. NaN fails every comparison, so it is refused too.
_RANGES = {
    "lr": (lambda v: 0 < v < math.inf, "a number > 0"),
    "redense_lr_factor": (lambda v: 0 < v < math.inf, "a number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "label_noise": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train_examples": (lambda v: v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "rnn_hidden": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 1, "an integer >= 1"),
    # More threads or worker processes than CPUs only compete for them; far more exhaust the
    # system's threads or processes.
    "threads": (lambda v: 0 <= v <= _CPUS,
                f"an integer in [0, {_CPUS}] (at most this machine's CPUs)"),
    "workers": (lambda v: 0 <= v <= _CPUS,
                f"an integer in [0, {_CPUS}] (at most this machine's CPUs)"),
    # NumPy's seed range; the batch order seeds torch with seed * 100_003 + epoch
    # (dsd.data.batches), which then stays inside torch's 64 bits.
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]"),
    "mnist1d_samples": (lambda v: v >= 100, "an integer >= 100"),
    "seq_len": (lambda v: v >= 1, "an integer >= 1"),
    "rnn_layers": (lambda v: v >= 1, "an integer >= 1"),
}
_PATHS = ("data", "init")  # stored absolute: a run resumes from any working directory


@dataclass(frozen=True)
class RunConfig:
    task: str = _option("mnist1d", "task: mnist1d and digits are embedded; cifar10, cifar100 "
                        "and tensors read --data; text reads --data or its embedded corpus", TASKS)
    data: str = _option("", "the task's data: a CIFAR directory (cifar-10-batches-py or "
                        "cifar-100-python, or the folder holding it), a UTF-8 text file (text), a "
                        ".pt or .npz of x and y tensors (tensors)")
    model: str = _option("auto", f"a built-in model ({', '.join(MODELS)}; auto: the task's "
                         "default), or MODULE:FACTORY, a callable returning an nn.Module (e.g. "
                         "torchvision.models:resnet18)")
    model_args: dict = _option({}, "keyword arguments of a MODULE:FACTORY model (JSON on the "
                               "command line, a table in a config file)")
    init: str = _option("", "state_dict to start from (a checkpoint file, model.pt of an "
                        "earlier run, a .safetensors file or a Hugging Face save_pretrained "
                        "directory): the first phase trains on from these weights")
    phases: list[int] = _option([12, 12, 12], "epochs of each phase, alternating dense and "
                                "sparse from dense: 12,12,12 is DSD, 8,8,8,8,8 is DSDSD")
    sparsity: float = _option(0.5, "fraction of each prunable tensor pruned in sparse phases")
    pattern: str = _option("", "N:M structured sparsity of the sparse phases: in every group of "
                           "M consecutive weights along dim 1 (in_features, in_channels) the N "
                           "largest are kept, e.g. 2:4; implies sparsity 1 - N/M; tensors that "
                           "cannot take it stay dense (--dry-run lists them); empty: "
                           "unstructured")
    masks: str = _option("magnitude", "where the sparse phases' masks come from: magnitude "
                         "(prune the smallest, by sparsity or pattern) or zeros (keep the exact "
                         "zeros of the --init model, pruned elsewhere: each layer keeps its own "
                         "sparsity; an S-only or S-D run, with first_phase sparse)", MASKS)
    scope: str = _option("layer", "prune per tensor (layer, the paper) or ranked over all "
                         "prunable tensors together (global)", dsd_kernels.SCOPES)
    include: list[str] = _option([], "prune exactly the parameters matching these fnmatch "
                                 "patterns (default: Linear/Conv/RNN/Embedding weights)")
    exclude: list[str] = _option([], "never prune parameters matching these patterns")
    first_phase: str = _option("dense", "kind of the first phase: sparse starts by pruning (S-D "
                               "on a converged --init network); the phases then alternate", KINDS)
    redense_lr_factor: float = _option(0.1, "learning-rate factor applied at each re-dense")
    optimizer: str = _option("adam", "a torch.optim optimizer by name, any case (sgd, adam, "
                             "adamw, rmsprop, nadam, adagrad, ...), or MODULE:CLASS, a "
                             "torch.optim.Optimizer subclass (e.g. lion_pytorch:Lion); made "
                             "masked in place (dsd_kernels.optim.make_masked_)")
    optimizer_args: dict = _option({}, "keyword arguments of the optimizer's constructor beside "
                                   "lr, weight_decay (where it takes one) and momentum (SGD) "
                                   "(JSON on the command line, a table in a config file)")
    lr: float = _option(2e-3, "learning rate of the first dense phase")
    momentum: float = _option(0.9, "SGD momentum (sgd only; others take it in optimizer_args)")
    weight_decay: float = _option(0.0, "weight decay, for every optimizer that takes one "
                                  "(decoupled for adamw)")
    batch_size: int = _option(64, "training batch size")
    seed: int = _option(0, "seed of the initialisation and the batch order, in [0, 2**32 - 1]")
    baseline: bool = _option(False, "also train densely for the same epochs with the same "
                             "LR drop, branching from the end of the first dense phase")
    val_fraction: float = _option(0.1, "share of the training set held out for validation")
    train_examples: int = _option(0, "train on this many examples of the training split, "
                                  "drawn per seed (0: all of them)")
    label_noise: float = _option(0.0, "share of training and validation labels moved to "
                                 "another class at random, per seed (test labels stay clean)")
    evaluate_test: bool = _option(True, "evaluate the test split after every epoch; false: "
                                  "validation only, the test split is never read")
    mnist1d_samples: int = _option(5000, "examples MNIST-1D generates (80%% train, 20%% test)")
    mlp_hidden: list[int] = _option([300, 100], "hidden widths of the MLP")
    cnn_channels: list[int] = _option([32, 32], "channels of the CNN's stride-2 convolutions")
    rnn_hidden: int = _option(64, "hidden size of the GRU/LSTM")
    rnn_layers: int = _option(1, "stacked layers of the GRU/LSTM")
    seq_len: int = _option(128, "characters per training sequence (text)")
    dropout: float = _option(0.0, "dropout on the MLP's hidden activations, or before the "
                             "classifier of the CNN and RNN")
    amp: str = _option("off", "mixed precision: autocast to bf16, or to fp16 with gradient "
                       "scaling", AMP)
    channels_last: bool = _option(False, "channels-last memory format for image models and "
                                  "their inputs")
    workers: int = _option(0, "DataLoader worker processes preparing the training batches "
                           "(0: in the training process), at most the machine's CPUs")
    device: str = _option("auto", "where to train (auto: cuda if available)", DEVICES)
    backend: str = field(
        # The config records the backend a run used, so `--resume` takes the same kernels
        # whatever the variable says then.
        default_factory=dsd_kernels.backend_from_env, metadata={
        "help": "dsd_kernels backend (auto: the fastest that loads)",
        "choices": dsd_kernels.BACKEND_CHOICES,
        "shown_default": "$DSD_BACKEND, else auto"})
    shard: bool = _option(False, "under torchrun, shard the model with FSDP2 (fully_shard) "
                          "instead of DDP: each rank holds a slice of every parameter, its "
                          "optimizer state and its mask; checkpoints are sharded "
                          "(torch.distributed.checkpoint) and resume on any number of ranks "
                          "(without torchrun: FSDP2 over this one process)")
    checkpoint_every: int = _option(1, "save a resumable checkpoint every N epochs")
    threads: int = _option(1, "CPU threads for torch (0: torch's default), at most the "
                           "machine's CPUs; these small models run fastest on one")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; choose one of "
                                 f"{', '.join(f.metadata['choices'])}")
        self._check_ranges()
        if self.masks == "zeros":
            self._check_zeros()
        self._check_model()
        self._check_optimizer()
        for name in _PATHS:
            if getattr(self, name):  # frozen: the absolute path replaces the given one
                object.__setattr__(self, name, str(Path(getattr(self, name)).expanduser()
                                                   .resolve()))
        self.plan()  # the plan validates phases, sparsity and patterns

    def _check_model(self):
        if self.model not in MODELS and not is_factory(self.model):
            raise ConfigError("model", f": unknown model {self.model!r}; choose one of "
                              f"{', '.join(MODELS)}, or give MODULE:FACTORY")
        if self.model_args and not is_factory(self.model):
            raise ConfigError("model_args", f" are for a MODULE:FACTORY model; the built-in "
                              f"{self.model!r} takes its own keys (mlp_hidden, rnn_hidden, ...)")
        for key in self.model_args:
            if not key.isidentifier():
                raise ConfigError("model_args", f": {key!r} is not a keyword argument name")

    def _check_optimizer(self):
        try:  # frozen: torch.optim's names are kept in lower case
            object.__setattr__(self, "optimizer", canonical_name(self.optimizer))
            cls = optimizer_class(self.optimizer)
        except ValueError as error:
            raise ConfigError("optimizer", str(error)) from None
        try:
            given = run_kwargs(cls, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)
        except ValueError as error:
            raise ConfigError("weight_decay", f" must be 0: {error}") from None
        for key in self.optimizer_args:
            if not key.isidentifier():
                raise ConfigError("optimizer_args", f": {key!r} is not a keyword argument name")
            if key == "params":
                raise ConfigError("optimizer_args", ": 'params' are the model's parameters")
            if key in given:
                raise ConfigError("optimizer_args", f": {key!r} is a run option of its own; set "
                                  f"{key} (--{key.replace('_', '-')}) instead")

    def _check_ranges(self):
        if not self.phases:
            raise ConfigError("phases", " is empty: give the epochs of at least one phase")
        for n in self.phases:
            if n < 1:
                raise ConfigError("phases", f": every phase needs at least 1 epoch, got {n}")
        try:
            dsd_kernels.check_sparsity(self.sparsity)
        except ValueError as error:  # "sparsity must be ...": the flag names the key instead
            raise ConfigError("sparsity", str(error).removeprefix("sparsity")) from None
        if self.pattern:
            self._check_pattern()
        for name, (accepts, what) in _RANGES.items():
            if not accepts(getattr(self, name)):
                raise ConfigError(name, f" must be {what}, got {getattr(self, name)!r}")
        for name in ("mlp_hidden", "cnn_channels"):
            widths = getattr(self, name)
            if not widths or any(w < 1 for w in widths):
                raise ConfigError(name, f" needs one or more positive widths, got {widths}")
        for f in fields(self):
            if f.type in (int, list[int]):
                value = getattr(self, f.name)
                if max(value if isinstance(value, list) else [value]) > _INT64_MAX:
                    raise ConfigError(f.name, f" must be at most 2**63 - 1, got {value!r}")

    def _check_pattern(self):
        """Canonical "N:M", and the sparsity it implies (the default 0.5 counts as not given:
        config.toml records the implied one)."""
        try:
            n, m = _checks.pattern(self.pattern)
        except ValueError as error:  # "pattern must be ...": the flag names the key instead
            raise ConfigError("pattern", str(error).removeprefix("pattern")) from None
        implied = 1 - n / m
        default = next(f.default for f in fields(self) if f.name == "sparsity")
        if self.sparsity != default and not math.isclose(self.sparsity, implied):
            raise ConfigError("sparsity", f" {self.sparsity:g} contradicts pattern {n}:{m}, which "
                              f"prunes {implied:g}; leave sparsity out")
        if self.scope == "global":
            raise ConfigError("scope", f" global does not apply to pattern {n}:{m}, which keeps "
                              "N in every group of M weights; use layer")
        object.__setattr__(self, "pattern", f"{n}:{m}")  # frozen
        object.__setattr__(self, "sparsity", implied)

    def _check_zeros(self):
        """masks zeros: a model with zeros to keep (--init), no phase before the sparse one
        that would fill them in, and no pruning of its own (the default sparsity counts as
        not given: config.toml records it)."""
        if not self.init:
            raise ConfigError("masks", " zeros keeps the exact zeros of an --init model, and a "
                              "random initialisation has none: give --init FILE")
        if self.first_phase == "dense":
            raise ConfigError("masks", " zeros needs --first-phase sparse: a dense phase "
                              "before it fills the model's zeros in")
        default = next(f.default for f in fields(self) if f.name == "sparsity")
        if self.pattern or self.sparsity != default:
            key = "pattern" if self.pattern else "sparsity"
            raise ConfigError(key, f" {getattr(self, key)} contradicts masks zeros, which keeps "
                              "the --init model's own sparsity; leave it out")
        if len(self.phases) > 2:
            raise ConfigError("phases", f" {','.join(map(str, self.phases))} from sparse has a "
                              "sparse phase after a dense one, which fills the zeros in; masks "
                              "zeros takes one phase (S) or two (S-D)")

    def plan(self) -> Plan:
        zeros = self.masks == "zeros"
        return Plan.from_lengths(self.phases, sparsity=None if zeros else self.sparsity,
                                 redense_lr_factor=self.redense_lr_factor, scope=self.scope,
                                 include=self.include, exclude=self.exclude,
                                 first=self.first_phase, pattern=self.pattern or None,
                                 masks=self.masks)

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
        return "".join(f"{key} = {_toml_value(value)}\n" for key, value in self.to_dict().items())


def _toml_value(value) -> str:
    """A TOML literal: JSON's strings, numbers, booleans and arrays are valid TOML; a table
    is written inline (TOML's `key = value` pairs, not JSON's `"key": value`)."""
    if isinstance(value, dict):
        pairs = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{{pairs}}}"
    if isinstance(value, list):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    return json.dumps(value)


def _check_type(name: str, value, annotation) -> None:
    """Strict types: a TOML typo such as sparsity = "0.5" is an error, not a silent cast."""
    origin = getattr(annotation, "__origin__", annotation)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f" must be a table of keyword arguments, got {value!r}")
    elif origin is list:
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
