"""`dsd train`: run a DSD plan (and optionally its equal-budget dense baseline) on a task (an
embedded one or the user's data, a built-in model or the user's factory), with a run
directory, checkpoints that resume bit-exactly, metrics, a plot and a summary.

Run directory:
    config.toml           every choice of the run (`dsd train --config` reads it back)
    metrics.jsonl         one row per arm and epoch
    sparsity.json         per-layer sparsity at the start and end of each phase
    plot.png              loss and accuracy over the phases (and the baseline's curves)
    summary.json/.txt     final numbers; the table printed at the end
    model.pt              the DSD model: a plain dense state_dict (baseline_model.pt likewise)
    checkpoints/last.pt   resume point; checkpoints/branch.pt is where the baseline branches off

Pairing: the baseline starts from the DSD run's state at the end of the first dense phase (same
init, same optimizer state, same RNG; at the start when the plan starts sparse), and every
epoch's batches depend only on the seed and the epoch (batches.py), so the two arms differ only
in the masks.
"""

import contextlib
import fcntl
import json
import math
import os
import random
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import dsd_kernels
from dsd_kernels.optim import MaskedAdam, MaskedAdamW, MaskedSGD, step_lr

from . import atomic_io, batches, report
from .config import RunConfig
from .models import build_model, default_model, is_factory, model_from_factory
from .runner import DSD, prunable_parameters
from .tasks import alter_training, load_task
from .world import World

FORMAT = 2  # checkpoint layout version
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Metrics that measure the machine, not the training: they differ between equal runs.
TIMING_KEYS = ("seconds", "train_seconds", "examples_per_second", "optimizer_share")
_EVAL_BATCH = 1024


class RunError(ValueError):
    """A run cannot start or resume as asked (bad config, foreign checkpoint, ...)."""


class DivergedError(RunError):
    """The loss or the weights stopped being finite (a learning rate too high, say)."""


class RunDirError(RunError):
    """The run directory cannot be used: args are (path, what is wrong), so that the command
    line can say which option gave the path."""

    def __str__(self):
        return f"{self.args[0]}: {self.args[1]}"


def model_label(config: RunConfig, data) -> str:
    """The model's name: the built-in one ("auto" resolved for the task) or the factory spec."""
    if is_factory(config.model):
        return config.model
    if config.model == "auto":
        return default_model(data.kind, data.signal_shape)
    return config.model


def default_run_dir(config: RunConfig, label: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^\w.-]+", "_", label.rpartition(":")[2])  # a factory: its callable's name
    return Path("runs") / f"{config.task}-{name}-s{config.seed}-{stamp}"


def train(config: RunConfig, run_dir=None, *, quiet: bool = False) -> dict:
    """Run (or resume) `config` in `run_dir`; returns the summary dict.

    A run directory that already holds this config resumes from its last checkpoint (or, if
    finished, just reports). Everything is validated before the directory is created (data,
    model, --init file), and the directory is locked while the run lasts: a second run on it
    is refused. A KeyboardInterrupt leaves with the run directory as its `run_dir`.
    """
    world, device = World.start(_resolve_device(config.device))
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        dsd_kernels.use_backend(config.backend)
    except dsd_kernels.BackendUnavailable as reason:
        raise RunError(str(reason)) from None
    data, init, _ = prepare(config, device)
    run_dir = Path(world.from_main(str(run_dir) if run_dir is not None
                                   else str(default_run_dir(config, model_label(config, data)))))
    lock, problem = None, None
    if world.main:  # one process claims the directory; all of them learn what went wrong
        try:
            lock = _claim_run_dir(config, run_dir)
        except (RunError, atomic_io.WriteError) as error:
            problem = error
    problem = world.from_main(problem)
    if problem:
        raise problem
    try:
        summary = _Run(config, data, init, run_dir, device, quiet, world).execute()
        world.close()
        return summary
    except KeyboardInterrupt as interrupt:
        interrupt.run_dir = run_dir
        raise
    except atomic_io.WriteError as error:
        raise atomic_io.WriteError(f"{error}; nothing saved before it is lost: resume with "
                                    f"`dsd train --resume {run_dir}`") from None
    finally:
        if lock is not None:
            os.close(lock)


def prepare(config: RunConfig, device) -> tuple:
    """(data, init state_dict or None, a built model): everything a run needs that can be
    wrong, checked before any file is written. The model is the run's initial one."""
    data = load_task(config.task, data=config.data or None, val_fraction=config.val_fraction,
                     mnist1d_samples=config.mnist1d_samples, seq_len=config.seq_len)
    data = alter_training(data, examples=config.train_examples, label_noise=config.label_noise,
                          seed=config.seed)
    if config.channels_last and not (data.kind == "image" and len(data.signal_shape) == 3):
        raise RunError(f"channels_last needs (C, H, W) image inputs; task {config.task} has "
                       f"{data.kind} inputs of shape {tuple(data.signal_shape)}")
    init = _read_init(config.init) if config.init else None
    # Include/exclude patterns, the init file's keys and the model's output get checked here.
    model = _Arm.build(config, data, "dsd", device, init=init).model
    _check_output(model, data, device, config)
    return data, init, model


def dry_run(config: RunConfig) -> str:
    """What `dsd train --dry-run` prints: every parameter of the model, whether the plan prunes
    it and how many of its weights each sparse phase zeroes; nothing is written."""
    data, _, model = prepare(config, _resolve_device(config.device))
    plan = config.plan()
    prunable = {name for name, _ in prunable_parameters(model, plan.include, plan.exclude)}
    sparse = [phase.sparsity for phase in plan.phases if phase.kind == "sparse"]
    rows = [["parameter", "shape", "weights", "pruned"]]
    for name, p in model.named_parameters():
        pruned = "-"
        if name in prunable and not sparse:
            pruned = "0 (no sparse phase)"
        elif name in prunable and plan.scope == "global":
            pruned = "ranked with all prunable tensors"
        elif name in prunable:
            pruned = ", ".join(f"{dsd_kernels.pruned_count(s, p.numel()):,}"
                               for s in sorted(set(sparse)))
        rows.append([name, "x".join(map(str, p.shape)), f"{p.numel():,}", pruned])
    total = sum(p.numel() for p in model.parameters())
    selected = sum(p.numel() for name, p in model.named_parameters() if name in prunable)
    lines = [f"task {config.task} ({data.source or 'embedded'}): {len(data.y_train):,} training, "
             f"{len(data.y_val):,} validation, {len(data.y_test):,} test examples of shape "
             f"{tuple(data.signal_shape)}, {data.num_classes} classes",
             f"model {model_label(config, data)}: {total:,} parameters, {len(prunable)} tensors "
             f"prunable holding {selected:,} weights ({selected / total:.1%}); plan "
             f"{','.join(map(str, config.phases))} epochs from {config.first_phase}, sparsity "
             f"{config.sparsity:g} ({config.scope} scope)"
             + (f", from {config.init}" if config.init else "")
             + (f": {dsd_kernels.pruned_count(config.sparsity, selected):,} weights pruned in all"
                if plan.scope == "global" and sparse else "")]
    lines += report.aligned(rows)
    return "\n".join(lines) + "\n"


def _read_init(path: str) -> dict:
    """The state_dict in an --init file: a plain one, or the entry "state_dict", "model" or
    "model_state_dict" of a checkpoint dict (a dsd checkpoint's is "model")."""
    try:
        state = atomic_io.load_torch(path)
    except atomic_io.ReadError as error:
        raise RunError(f"init file: {error}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise RunError(f"init file {path} holds no state_dict (a dict of parameter names to "
                       "tensors, alone or as the 'state_dict' or 'model' entry of a dict)")
    where = _non_finite(state)
    if where is not None:
        raise RunError(f"init file {path} holds NaN or Inf in {where!r}")
    return state


def _load_init(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load `state` into `model`, or raise naming every key and shape that does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} is {tuple(state[k].shape)} there, {tuple(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} {_listed(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
    if shapes:
        problems.append(f"shapes differ: {_listed(shapes)}")
    if problems:
        raise RunError(f"init file {path} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


def _listed(items: list[str], most: int = 4) -> str:
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _check_output(model, data, device, config: RunConfig) -> None:
    """Two validation examples through the model: its output must hold one score per class
    (per character for text), or the run would fail at its first batch."""
    x = data.x_val[:2].to(device)
    expected = (len(x), *data.y_val.shape[1:], data.num_classes)
    try:
        with torch.no_grad(), _autocast(config, device):
            model.eval()
            out = model(x)
    except Exception as error:  # the user's model on our inputs: any failure is theirs to fix
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise RunError(f"model {model_label(config, data)} fails on task {config.task}'s inputs "
                       f"(a batch of shape {tuple(x.shape)}): {type(error).__name__}: "
                       f"{first_line}") from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != expected:
        hint = " (give model_args such as num_classes)" if is_factory(config.model) else ""
        raise RunError(f"model {model_label(config, data)} gives output {shape} for a batch of "
                       f"shape {tuple(x.shape)}; task {config.task} needs {expected} "
                       f"({data.num_classes} classes){hint}")


def _autocast(config: RunConfig, device):
    if config.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[config.amp])


def _to_device(x: torch.Tensor, config: RunConfig, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


@torch.no_grad()
def _evaluate(model, x, y, config: RunConfig, device) -> tuple[float, float]:
    """Mean loss and accuracy over every prediction of (x, y)."""
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(y), _EVAL_BATCH):
        with _autocast(config, device):
            losses, correct = _losses(model(_to_device(x[i:i + _EVAL_BATCH], config, device)),
                                      y[i:i + _EVAL_BATCH].to(device))
        stats += torch.stack([losses.double().sum(), correct.double()])
    loss_sum, correct = stats.tolist()
    predictions = y.numel()
    return loss_sum / predictions, correct / predictions


def evaluate_saved(run_dir, split: str, arm: str = "dsd") -> dict:
    """Loss and accuracy (and bits per character for text) of a finished run's final model
    (`arm` dsd: model.pt, baseline: baseline_model.pt) on `split` of its task. The study
    calls it for the test split only after choosing its learning rates on validation."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    device = _resolve_device(config.device)
    data, _, model = prepare(config, device)
    path = run_dir / ("model.pt" if arm == "dsd" else "baseline_model.pt")
    try:
        model.load_state_dict(atomic_io.load_torch(path))
    except atomic_io.ReadError as error:
        raise RunError(f"cannot evaluate: {error}") from None
    loss, acc = _evaluate(model, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"),
                          config, device)
    result = {f"{split}_loss": loss, f"{split}_acc": acc}
    if data.kind == "text":
        result[f"{split}_bpc"] = loss / math.log(2)
    return result


def load_config(run_dir) -> RunConfig:
    """The config a run directory was started with."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise RunDirError(run_dir, "not a dsd run directory (no config.toml)")
    return RunConfig.from_toml(path)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def _claim_run_dir(config: RunConfig, run_dir: Path) -> int:
    """Create the run directory and its config, or check the config of an existing one, and
    lock it for this process; returns the lock's file descriptor.

    The lock is a flock on the directory itself: it writes nothing, a second `dsd train` on the
    directory is refused while this process lives, and the kernel drops it when the process
    dies, however it dies. A directory that holds a run is not modified here.
    """
    for path in (run_dir, *run_dir.parents):  # the first part of the path that exists
        if path.exists():
            if not path.is_dir():
                raise RunDirError(run_dir, f"{path} is a file, not a directory")
            break
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
            created = True
        except FileExistsError:
            created = False
    except OSError as error:
        raise RunDirError(run_dir, f"cannot create it: {error.strerror}") from None
    try:
        lock = os.open(run_dir, os.O_RDONLY)
    except OSError as error:
        raise RunDirError(run_dir, f"cannot open it: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)  # the holder may have made the directory too: leave it alone
        raise RunDirError(run_dir, "another dsd train is running in it; wait for it to end, "
                          "or choose another --out") from None
    try:
        if created or not any(run_dir.iterdir()):
            # An empty directory is a new run (or one killed before its config was written).
            atomic_io.save_text(config.to_toml(), run_dir / "config.toml")
        else:
            saved = load_config(run_dir)
            if saved != config:
                diff = ", ".join(f"{key}: {saved.to_dict()[key]!r} there, {value!r} here"
                                 for key, value in config.to_dict().items()
                                 if saved.to_dict()[key] != value)
                raise RunDirError(run_dir, f"holds a run with another config ({diff}); choose "
                                  "another --out, or `dsd train --resume` it as it is")
    except BaseException:
        if created:
            run_dir.rmdir()
        os.close(lock)
        raise
    return lock


def _non_finite(state) -> str | None:
    """The key path of the first floating tensor in `state` holding NaN or Inf, if any."""
    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(state.isfinite().all())
        return None if finite else ""
    items = state.items() if isinstance(state, dict) else \
        enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        where = _non_finite(value)
        if where is not None:
            return f"{key}.{where}" if where else str(key)
    return None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _losses(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every prediction (one per example; one per character for text), in
    fp32 whatever the autocast dtype, and the number of correct ones."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    losses = F.cross_entropy(flat, y.reshape(-1), reduction="none")
    return losses, (flat.argmax(1) == y.reshape(-1)).sum()


class _Arm:
    """One arm's live objects: the model, its masked optimizer, the DSD runner and (fp16) the
    gradient scaler; `net` is the module that runs the batches (the model itself, or its DDP
    wrapper under torchrun)."""

    def __init__(self, name, model, dsd, net, scaler):
        self.name, self.model, self.dsd, self.net, self.scaler = name, model, dsd, net, scaler

    @classmethod
    def build(cls, config: RunConfig, data, name: str, device, world: World | None = None,
              init: dict | None = None) -> "_Arm":
        torch.manual_seed(config.seed)  # the same initial weights for both arms and devices
        if is_factory(config.model):
            model = model_from_factory(config.model, config.model_args)
        else:
            model = build_model(config.model, data.signal_shape, data.num_classes,
                                kind=data.kind, mlp_hidden=config.mlp_hidden,
                                cnn_channels=config.cnn_channels, rnn_hidden=config.rnn_hidden,
                                rnn_layers=config.rnn_layers, dropout=config.dropout)
        if init is not None:
            _load_init(model, init, config.init)
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.optimizer == "sgd":
            optimizer = MaskedSGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)
        else:
            masked = MaskedAdam if config.optimizer == "adam" else MaskedAdamW
            optimizer = masked(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        plan = config.plan()
        dsd = DSD(model, optimizer, plan if name == "dsd" else plan.dense_baseline())
        scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        return cls(name, model, dsd, world.wrap(model, device) if world else model, scaler)

    @property
    def optimizer(self):
        return self.dsd.optimizer


class _StepClock:
    """Seconds spent in the optimizer's step over an epoch. On CUDA the step is timed on the
    stream with events: a host clock would see only the kernel launches."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds, self.events = 0.0, []

    @contextlib.contextmanager
    def timing(self):
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began

    def total(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        return self.seconds


class _Run:
    def __init__(self, config: RunConfig, data, init: dict | None, run_dir: Path, device,
                 quiet: bool, world: World):
        self.config, self.data, self.run_dir, self.device = config, data, run_dir, device
        self.init, self.world = init, world
        self.quiet = quiet or not world.main
        self.bars = not self.quiet and sys.stderr.isatty()
        self.plan = config.plan()
        self.arm_names = ["dsd", "baseline"] if config.baseline else ["dsd"]
        # The arms share a first dense phase; the baseline branches off after it (or at the
        # start, from the same weights, when the plan starts sparse).
        self.branch_epoch = self.plan.phases[0].length if self.plan.phases[0].kind == "dense" \
            else 0
        self.ckpt_dir = run_dir / "checkpoints"
        self.history = {name: [] for name in self.arm_names}
        self.sparsity = {name: [] for name in self.arm_names}
        self.seconds = 0.0
        # Workers prepare batches from CPU memory; without them the batches are cut on the
        # device from tensors moved there once.
        self.splits = ("val", "test") if config.evaluate_test else ("val",)
        self.data_on_device = {name: getattr(data, name).to(
            "cpu" if split == "train" and config.workers else device)
            for split in ("train", *self.splits) for name in (f"x_{split}", f"y_{split}")}
        self.predictions_per_example = math.prod(data.y_train.shape[1:])  # text: seq_len

    # ---- checkpoints -------------------------------------------------------------------
    def _state(self, arm: _Arm | None, next_epoch: int) -> dict:
        return {"format": FORMAT, "config": self.config.to_dict(),
                "arm": arm.name if arm else "done", "next_epoch": next_epoch,
                "model": arm.model.state_dict() if arm else None,
                "optimizer": arm.optimizer.state_dict() if arm else None,
                "phase_index": arm.dsd.phase_index if arm else None,
                "scaler": arm.scaler.state_dict() if arm and arm.scaler else None,
                "rng": _rng_state(), "history": self.history, "sparsity": self.sparsity,
                "seconds": self.seconds}

    def _load_checkpoint(self, path: Path) -> dict:
        """The checkpoint at `path`, checked to be this run's and finite before anything uses
        it; otherwise a RunError naming the file and the fault, with nothing modified."""
        try:
            state = atomic_io.load_torch(path)
        except atomic_io.ReadError as error:
            raise RunError(f"cannot resume: {error}") from None
        if not isinstance(state, dict) or "format" not in state:
            raise RunError(f"cannot resume: {path} is not a dsd checkpoint")
        if state["format"] != FORMAT:
            raise RunError(f"cannot resume: {path} has checkpoint format {state['format']!r}; "
                           f"this dsd reads format {FORMAT}")
        if state.get("config") != self.config.to_dict():
            raise RunError(f"cannot resume: {path} belongs to another config")
        missing = sorted(set(self._state(None, 0)) - set(state))
        if missing or state["arm"] not in (*self.arm_names, "done"):
            raise RunError(f"cannot resume: {path} is a damaged dsd checkpoint "
                           f"({'no ' + ', '.join(missing) if missing else 'unknown arm'})")
        for part in ("model", "optimizer"):
            where = _non_finite(state[part])
            if where is not None:
                raise RunError(f"cannot resume: {path} holds NaN or Inf in {part} entry "
                               f"{where!r}")
        return state

    def _restore(self, state: dict, name: str, path: Path, *,
                 records: bool = True) -> tuple[_Arm | None, int]:
        """Rebuild arm `name` from a checkpoint read from `path`; `records=False` keeps this
        run's metrics (to branch the baseline off while keeping the DSD arm's history)."""
        if records:
            self.history, self.sparsity = state["history"], state["sparsity"]
            self.seconds = state["seconds"]
        if name == "done":
            return None, 0
        arm = _Arm.build(self.config, self.data, name, self.device, self.world)
        try:
            arm.model.load_state_dict(state["model"])
            arm.optimizer.load_state_dict(state["optimizer"])  # state, LRs and masks
            # The arms' phases agree up to the branch, so a phase index carries across.
            arm.dsd.load_state_dict({"phase_index": state["phase_index"],
                                     "plan": arm.dsd.plan.to_dict()})
            if arm.scaler:
                arm.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise RunError(f"cannot resume: {path} does not fit this run "
                           f"({type(error).__name__}: {first_line})") from None
        return arm, state["next_epoch"]

    def _save(self, arm: _Arm | None, next_epoch: int, filename: str = "last.pt") -> None:
        if self.world.main:  # the ranks' states are the same: one copy, on any world size
            atomic_io.save_torch(self._state(arm, next_epoch), self.ckpt_dir / filename)

    # ---- the run -------------------------------------------------------------------------
    def execute(self) -> dict:
        last = self.ckpt_dir / "last.pt"
        if last.exists():  # checked before the first write: a bad one leaves the run as it is
            state = self._load_checkpoint(last)
            arm, next_epoch = self._restore(state, state["arm"], last)
            if arm is not None:
                self._say(f"resuming {self.run_dir}: {arm.name} arm at epoch {next_epoch + 1}")
        else:
            arm, next_epoch = _Arm.build(self.config, self.data, "dsd", self.device,
                                         self.world, self.init), 0
        if self.world.main:
            with atomic_io.writing(self.ckpt_dir):
                self.ckpt_dir.mkdir(exist_ok=True)
            atomic_io.remove_stale_temps(self.ckpt_dir)
            atomic_io.remove_stale_temps(self.run_dir)
        if next_epoch == 0 and arm is not None and self.config.baseline \
                and self.branch_epoch == 0:
            self._save(arm, 0, "branch.pt")  # a sparse-first plan: both arms start here
        self._rewrite_metrics()
        while arm is not None:
            self._train_arm(arm, next_epoch)
            self.world.check_replicas(arm.model.parameters())
            if self.world.main:
                final = {k: v.detach().cpu().clone() for k, v in arm.model.state_dict().items()}
                atomic_io.save_torch(final, self.run_dir / ("model.pt" if arm.name == "dsd"
                                                             else "baseline_model.pt"))
            following = self.arm_names.index(arm.name) + 1
            if following < len(self.arm_names):
                self.world.barrier()  # branch.pt is written by rank 0
                branch = self.ckpt_dir / "branch.pt"
                arm, next_epoch = self._restore(self._load_checkpoint(branch),
                                                self.arm_names[following], branch,
                                                records=False)
                self._say(f"baseline: dense from epoch {next_epoch + 1}, branched from the DSD "
                          "run after its first dense phase")
            else:
                arm = None
            self._save(arm, next_epoch)
        return self._write_outputs()

    def _train_arm(self, arm: _Arm, start: int) -> None:
        total = self.plan.total
        epochs = tqdm(range(start, total), desc=arm.name, initial=start, total=total,
                      disable=not self.bars, unit="epoch", leave=False)
        for epoch in epochs:
            began = time.perf_counter()
            if arm.dsd.epoch_start(epoch):
                self._phase_started(arm, epoch)
            train_loss, train_acc, train_seconds, step_seconds = self._train_epoch(arm, epoch)
            self._check_finite(arm, epoch, train_loss)
            row = {"arm": arm.name, "epoch": epoch + 1, "phase": arm.dsd.phase_index,
                   "kind": arm.dsd.phase.kind, "lr": step_lr(arm.optimizer.param_groups[0]),
                   "train_loss": train_loss, "train_acc": train_acc}
            for split in self.splits:
                row[f"{split}_loss"], row[f"{split}_acc"] = self._evaluate(arm.model, split)
            if self.data.kind == "text":  # bits per character: the loss in nats over ln 2
                for split in ("train", *self.splits):
                    row[f"{split}_bpc"] = row[f"{split}_loss"] / math.log(2)
            row["sparsity"] = self._overall_sparsity(arm)
            row["train_seconds"] = round(train_seconds, 3)
            row["examples_per_second"] = round(len(self.data.y_train) / train_seconds, 1)
            row["optimizer_share"] = round(step_seconds / train_seconds, 4)
            self.seconds += time.perf_counter() - began
            row["seconds"] = round(time.perf_counter() - began, 3)
            self.history[arm.name].append(row)
            phase_end = self.plan.starts[arm.dsd.phase_index] + arm.dsd.phase.length
            if epoch + 1 == phase_end:
                self.sparsity[arm.name][-1]["end"] = arm.dsd.sparsity()
            at_branch = (arm.name == "dsd" and self.config.baseline
                         and epoch + 1 == self.branch_epoch)
            if at_branch:  # before last.pt: a resume past the branch must find branch.pt
                self._save(arm, epoch + 1, "branch.pt")
            if (epoch + 1) % self.config.checkpoint_every == 0 or epoch + 1 == total or at_branch:
                self._save(arm, epoch + 1)
            self._append_metrics(row)
            self._say(f"{arm.name:8s} epoch {epoch + 1:3d}/{total}  {row['kind']:6s} "
                      f"lr {row['lr']:.2g}  train loss {train_loss:.4f}  "
                      f"val acc {row['val_acc']:.2%}"
                      + (f"  test acc {row['test_acc']:.2%}" if "test_acc" in row else ""))
        epochs.close()

    def _check_finite(self, arm: _Arm, epoch: int, train_loss: float) -> None:
        """Stop at the first epoch whose loss or weights are not finite, before its checkpoint
        and metrics row: the last checkpoint stays the last finite state."""
        finite = torch.stack([p.detach().isfinite().all() for p in arm.model.parameters()])
        if math.isfinite(train_loss) and finite.all():
            return
        lr = step_lr(arm.optimizer.param_groups[0])
        weights = ", weights not finite" if math.isfinite(train_loss) else ""
        raise DivergedError(f"training diverged in epoch {epoch + 1} of the {arm.name} arm "
                            f"({arm.dsd.phase.kind} phase, lr {lr:g}): train loss {train_loss:g}"
                            f"{weights}; stopped before saving it, so the run's files hold only "
                            "the epochs before it (try a lower lr in a new run)")

    def _phase_started(self, arm: _Arm, epoch: int) -> None:
        index, phase = arm.dsd.phase_index, arm.dsd.phase
        sparsity = arm.dsd.sparsity()
        self.sparsity[arm.name].append({
            "phase": index, "kind": phase.kind, "target_sparsity": phase.sparsity,
            "first_epoch": self.plan.starts[index] + 1,
            "last_epoch": self.plan.starts[index] + phase.length,
            "lr_scale": phase.lr_scale, "start": sparsity, "end": None})
        what = (f"pruned {phase.sparsity:.0%} ({self.plan.scope} scope)" if phase.kind == "sparse"
                else "dense" + (", mask lifted" if index and arm.dsd.plan.phases[index - 1].kind
                                == "sparse" else ""))
        self._say(f"{arm.name:8s} phase {index + 1}/{len(self.plan.phases)} from epoch "
                  f"{epoch + 1}: {what}, lr x{phase.lr_scale:g}")

    def _train_epoch(self, arm: _Arm, epoch: int) -> tuple[float, float, float, float]:
        """Train loss and accuracy over the epoch's predictions, the seconds of the epoch's
        training loop and the seconds of its optimizer steps."""
        began = time.perf_counter()
        epoch_batches = batches.EpochBatches(
            self.data, self.data_on_device["x_train"], self.data_on_device["y_train"],
            seed=self.config.seed, epoch=epoch, batch_size=self.config.batch_size,
            rank=self.world.rank, ranks=self.world.size)
        feed = batches.loader(epoch_batches, workers=self.config.workers,
                              pin_memory=self.device.type == "cuda")
        arm.net.train()
        clock = _StepClock(self.device)
        stats = torch.zeros(2, device=self.device)  # loss sum, correct count
        per_example, ranks = self.predictions_per_example, self.world.size
        for x, y, weight, size in tqdm(feed, desc=f"epoch {epoch + 1}", disable=not self.bars,
                                       leave=False, unit="batch"):
            x, y = self._to_device(x), y.to(self.device, non_blocking=True)
            with _autocast(self.config, self.device):
                logits = arm.net(x)
                losses, correct = _losses(logits, y)
            arm.optimizer.zero_grad(set_to_none=True)
            # The loss is scaled so that DDP's mean over ranks is the gradient of the global
            # batch's mean loss (a rank left without examples runs one with weight 0).
            loss = losses.sum() * (weight * ranks / (size * per_example))
            (arm.scaler.scale(loss) if arm.scaler else loss).backward()
            with clock.timing():  # the masked optimizer's share of the step
                if arm.scaler:
                    arm.scaler.step(arm.optimizer)
                    arm.scaler.update()
                else:
                    arm.optimizer.step()
            stats += weight * torch.stack([losses.detach().sum(), correct.float()])
        loss_sum, correct = self.world.sum_(stats).tolist()
        predictions = len(self.data.y_train) * per_example
        return (loss_sum / predictions, correct / predictions, time.perf_counter() - began,
                clock.total())

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return _to_device(x, self.config, self.device)

    def _evaluate(self, model, split: str) -> tuple[float, float]:
        return _evaluate(model, self.data_on_device[f"x_{split}"],
                         self.data_on_device[f"y_{split}"], self.config, self.device)

    @staticmethod
    def _overall_sparsity(arm: _Arm) -> float:
        zeros = sum((p.detach() == 0).sum().item() for _, p in arm.dsd.named_prunable)
        return zeros / sum(p.numel() for _, p in arm.dsd.named_prunable)

    # ---- outputs -------------------------------------------------------------------------
    def _append_metrics(self, row: dict) -> None:
        if not self.world.main:
            return
        path = self.run_dir / "metrics.jsonl"
        with atomic_io.writing(path), open(path, "a") as file:
            file.write(json.dumps(row) + "\n")

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl as of the checkpoint: rows written after it are dropped, rows a kill
        kept from being written are restored."""
        if not self.world.main:
            return
        rows = [row for name in self.arm_names for row in self.history[name]]
        atomic_io.save_text("".join(json.dumps(row) + "\n" for row in rows),
                             self.run_dir / "metrics.jsonl")

    def _write_outputs(self) -> dict:
        summary = report.summary(self.config, self.plan, self.history, self.sparsity,
                                 self.branch_epoch, self.seconds, self.run_dir,
                                 model_label(self.config, self.data))
        summary["world_size"] = self.world.size
        summary["examples"] = {split: len(getattr(self.data, f"y_{split}"))
                               for split in ("train", "val", "test")}
        summary["data"] = self.data.source
        if not self.world.main:
            return summary
        atomic_io.save_json(self.sparsity, self.run_dir / "sparsity.json")
        atomic_io.save_json(summary, self.run_dir / "summary.json")
        atomic_io.save_text(report.table(summary), self.run_dir / "summary.txt")
        png = report.plot(self.plan, self.history, branch_epoch=self.branch_epoch,
                          title=f"DSD on {self.config.task} / {summary['model']} "
                                f"(sparsity {self.config.sparsity:g}, seed {self.config.seed})")
        atomic_io.save_bytes(png, self.run_dir / "plot.png")
        return summary

    def _say(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)
