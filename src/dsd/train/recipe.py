"""`dsd train`: run a DSD plan (and optionally its equal-budget dense baseline) on a task (an
embedded one or the user's data, a built-in model or the user's factory), with a run
directory, checkpoints that resume bit-exactly, metrics, a plot and a summary. This module
only orchestrates: setup, the arms' epoch loops, the outputs.

Run directory:
    config.toml           every choice of the run (`dsd train --config` reads it back)
    metrics.jsonl         one row per arm and epoch
    sparsity.json         per-layer sparsity at the start and end of each phase
    plot.png              loss and accuracy over the phases (and the baseline's curves)
    summary.json/.txt     final numbers; the table printed at the end
    model.pt              the DSD model: a plain dense state_dict (baseline_model.pt likewise)
    checkpoints/last.pt   resume point; checkpoints/branch.pt is where the baseline branches off
                          (under --shard each names a DCP directory beside it: sharded.py)

Pairing: the baseline starts from the DSD run's state at the end of the first dense phase (same
init, same optimizer state, same RNG; at the start when the plan starts sparse), and every
epoch's batches depend only on the seed and the epoch (batches.py), so the two arms differ only
in the masks.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dsd_kernels
from dsd_kernels.optim import step_lr

from .. import atomic_io
from ..config import RunConfig
from ..world import World
from . import checkpoints, outputs, report, sharded
from .arms import Arm, model_label
from .compute import resolve_device
from .epoch import train_epoch
from .errors import DivergedError, RunError
from .evaluate import evaluate
from .init_file import InitWeights
from .prepare import prepare
from .run_dir import claim_run_dir, default_run_dir

# Metrics that measure the machine, not the training: they differ between equal runs.
TIMING_KEYS = ("seconds", "train_seconds", "examples_per_second", "optimizer_share")


def train(config: RunConfig, run_dir=None, *, quiet: bool = False) -> dict:
    """Run (or resume) `config` in `run_dir`.

    A run directory that already holds this config resumes from its last checkpoint (or, if
    finished, just reports). Everything is validated before the directory is created (data,
    model, --init file), and the directory is locked while the run lasts: a second run on it
    is refused.

    Args:
        config: the run's options.
        run_dir: the run directory; None: runs/TASK-MODEL-sSEED-TIME.
        quiet: no progress bars or per-epoch lines.

    Returns:
        The summary (as summary.json holds it): config, phases, each arm's final and
        per-phase metrics, speed, per-layer sparsity, the run directory.

    Raises:
        RunDirError: the run directory cannot be used (a file, another config, locked by a
            live run); the message names the path.
        RunError: the config, data, model, --init file or a checkpoint does not allow the run.
        ConfigError: the optimizer refuses its arguments or cannot be masked (the message
            names the config key).
        DivergedError: the loss or the weights stopped being finite; the files hold the epochs
            before.
        atomic_io.WriteError: a file could not be written (the message says how to resume).
        KeyboardInterrupt: with the run directory as its `run_dir` attribute.
    """
    world, device = World.start(resolve_device(config.device), config.shard)
    try:
        return _train_in(world, device, config, run_dir, quiet)
    finally:
        if world.size == 1:  # a --shard run's group of one: ended however the run ends
            world.close()


def _train_in(world: World, device, config: RunConfig, run_dir, quiet: bool) -> dict:
    """train() in the world started for it."""
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
            lock = claim_run_dir(config, run_dir)
        except (RunError, atomic_io.WriteError) as error:
            problem = error
    problem = world.from_main(problem)
    if problem:
        raise problem
    try:
        summary = Run(config, data, init, run_dir, device, quiet, world).execute()
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


class Run:
    """One run in its locked directory: resume or start, train each arm, write the outputs."""

    def __init__(self, config: RunConfig, data, init: InitWeights | None, run_dir: Path, device,
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

    # ---- checkpoints -------------------------------------------------------------------
    def _restore(self, state: dict, name: str, path: Path, *,
                 records: bool = True) -> tuple[Arm | None, int]:
        """Rebuild arm `name` from a checkpoint read from `path`; `records=False` keeps this
        run's metrics (to branch the baseline off while keeping the DSD arm's history)."""
        if records:
            self.history, self.sparsity = state["history"], state["sparsity"]
            self.seconds = state["seconds"]
        if name == "done":
            return None, 0
        arm = Arm.build(self.config, self.data, name, self.device, self.world)
        if self.config.shard:
            sharded.restore(arm, state, path, self.world)
        else:
            checkpoints.restore(arm, state, path)
        return arm, state["next_epoch"]

    def _read(self, path: Path) -> dict:
        return checkpoints.read(path, self.config, self.arm_names)

    def _check_resume_needs(self, arm: str, next_epoch: int) -> None:
        """Refuse a resume that would fail later for want of a file the run wrote earlier:
        branch.pt while the baseline arm has still to start from it, model.pt once the DSD arm
        has ended (the baseline arm's run does not rebuild it)."""
        branch = self.ckpt_dir / "branch.pt"
        if arm == "dsd" and self.config.baseline and next_epoch >= self.branch_epoch \
                and next_epoch > 0:
            if not branch.exists():
                raise RunError(f"cannot resume: {branch} is missing; the baseline arm starts "
                               "from it once the DSD arm ends, and only a new run (another "
                               "--out) can make it again")
            self._read(branch)
        model = self.run_dir / "model.pt"
        if arm == "baseline" and not model.exists():
            raise RunError(f"cannot resume: {model} (the DSD arm's final weights) is missing, "
                           "and the baseline arm left to train does not make it again: start a "
                           "new run (another --out)")

    def _save(self, arm: Arm | None, next_epoch: int, filename: str = "last.pt") -> None:
        if self.config.shard:  # every rank writes its slices
            sharded.save(arm, next_epoch, self.ckpt_dir / filename, self.world,
                         config=self.config, history=self.history, sparsity=self.sparsity,
                         seconds=self.seconds)
        elif self.world.main:  # the ranks' states are the same: one copy, on any world size
            state = checkpoints.capture(arm, next_epoch, config=self.config,
                                        history=self.history, sparsity=self.sparsity,
                                        seconds=self.seconds)
            atomic_io.save_torch(state, self.ckpt_dir / filename)

    # ---- the run -------------------------------------------------------------------------
    def execute(self) -> dict:
        last = self.ckpt_dir / "last.pt"
        if last.exists():  # checked before the first write: a bad one leaves the run as it is
            state = self._read(last)
            self._check_resume_needs(state["arm"], state["next_epoch"])
            arm, next_epoch = self._restore(state, state["arm"], last)
            if arm is not None:
                self._say(f"resuming {self.run_dir}: {arm.name} arm at epoch {next_epoch + 1}")
        else:
            arm, next_epoch = Arm.build(self.config, self.data, "dsd", self.device, self.world,
                                        self.init and self.init.state), 0
            if self.init:
                self._say(f"starting from {self.config.init}: {self.init.holds}")
        if self.world.main:
            with atomic_io.writing(self.ckpt_dir):
                self.ckpt_dir.mkdir(exist_ok=True)
            atomic_io.remove_stale_temps(self.ckpt_dir)
            atomic_io.remove_stale_temps(self.run_dir)
        if next_epoch == 0 and arm is not None and self.config.baseline \
                and self.branch_epoch == 0:
            self._save(arm, 0, "branch.pt")  # a sparse-first plan: both arms start here
        if self.world.main:
            outputs.rewrite_metrics(self.run_dir, [row for name in self.arm_names
                                                   for row in self.history[name]])
        while arm is not None:
            self._train_arm(arm, next_epoch)
            self.world.check_replicas(arm.model.parameters())
            if self.config.shard:  # the whole tensors, gathered to rank 0
                final = sharded.full_state_dict(arm.model)
            else:
                final = {k: v.detach().cpu().clone() for k, v in arm.model.state_dict().items()}
            if self.world.main:
                atomic_io.save_torch(final, self.run_dir / ("model.pt" if arm.name == "dsd"
                                                            else "baseline_model.pt"))
            following = self.arm_names.index(arm.name) + 1
            if following < len(self.arm_names):
                self.world.barrier()  # branch.pt is written by rank 0
                branch = self.ckpt_dir / "branch.pt"
                arm, next_epoch = self._restore(self._read(branch), self.arm_names[following],
                                                branch, records=False)
                self._say(f"baseline: dense from epoch {next_epoch + 1}, branched from the DSD "
                          "run after its first dense phase")
            else:
                arm = None
            self._save(arm, next_epoch)
        return self._write_outputs()

    def _train_arm(self, arm: Arm, start: int) -> None:
        total = self.plan.total
        epochs = tqdm(range(start, total), desc=arm.name, initial=start, total=total,
                      disable=not self.bars, unit="epoch", leave=False)
        for epoch in epochs:
            began = time.perf_counter()
            if arm.dsd.epoch_start(epoch):
                self._phase_started(arm, epoch)
            train_loss, train_acc, train_seconds, step_seconds = train_epoch(
                arm, epoch, self.data, self.data_on_device["x_train"],
                self.data_on_device["y_train"], self.config, self.device, self.world,
                bars=self.bars)
            self._check_finite(arm, epoch, train_loss)
            row = {"arm": arm.name, "epoch": epoch + 1, "phase": arm.dsd.phase_index,
                   "kind": arm.dsd.phase.kind, "lr": step_lr(arm.optimizer.param_groups[0]),
                   "train_loss": train_loss, "train_acc": train_acc}
            for split in self.splits:
                row[f"{split}_loss"], row[f"{split}_acc"] = self._evaluate(arm.model, split)
            if self.data.kind == "text":  # bits per character: the loss in nats over ln 2
                for split in ("train", *self.splits):
                    row[f"{split}_bpc"] = row[f"{split}_loss"] / math.log(2)
            row["sparsity"] = _overall_sparsity(arm, self.world)
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
            if self.world.main:
                outputs.append_metrics(self.run_dir, row)
            self._say(report.epoch_line(row, total))
        epochs.close()

    def _evaluate(self, model, split: str) -> tuple[float, float]:
        return evaluate(model, self.data_on_device[f"x_{split}"],
                        self.data_on_device[f"y_{split}"], self.config, self.device)

    def _check_finite(self, arm: Arm, epoch: int, train_loss: float) -> None:
        """Stop at the first epoch whose loss or weights are not finite, before its checkpoint
        and metrics row: the last checkpoint stays the last finite state."""
        infinite = torch.stack([~dsd_kernels.local_tensor(p.detach()).isfinite().all()
                                for p in arm.model.parameters()]).sum()
        if self.config.shard:  # each rank sees its slices: the ranks agree through the sum
            self.world.sum_(infinite)
        if math.isfinite(train_loss) and not infinite:
            return
        lr = step_lr(arm.optimizer.param_groups[0])
        weights = ", weights not finite" if math.isfinite(train_loss) else ""
        raise DivergedError(f"training diverged in epoch {epoch + 1} of the {arm.name} arm "
                            f"({arm.dsd.phase.kind} phase, lr {lr:g}): train loss {train_loss:g}"
                            f"{weights}; stopped before saving it, so the run's files hold only "
                            "the epochs before it (try a lower lr in a new run)")

    def _phase_started(self, arm: Arm, epoch: int) -> None:
        index, phase = arm.dsd.phase_index, arm.dsd.phase
        sparsity = arm.dsd.sparsity()
        self.sparsity[arm.name].append({
            "phase": index, "kind": phase.kind, "target_sparsity": phase.sparsity,
            "first_epoch": self.plan.starts[index] + 1,
            "last_epoch": self.plan.starts[index] + phase.length,
            "lr_scale": phase.lr_scale, "start": sparsity, "end": None})
        if phase.masks == "zeros":
            what = (f"kept the model's zeros ({_overall_sparsity(arm, self.world):.1%} of the "
                    "prunable weights)")
        elif phase.kind == "sparse":
            what = (f"pruned {phase.pattern} ({phase.sparsity:.0%} of the tensors that take it)"
                    if phase.pattern else f"pruned {phase.sparsity:.0%} ({self.plan.scope} scope)")
        else:
            what = "dense" + (", mask lifted" if index and arm.dsd.plan.phases[index - 1].kind
                              == "sparse" else "")
        self._say(f"{arm.name:8s} phase {index + 1}/{len(self.plan.phases)} from epoch "
                  f"{epoch + 1}: {what}, lr x{phase.lr_scale:g}")
        if phase.masks == "zeros":  # what the model brought, before its first batch
            for name, share in arm.dsd.found_sparsity.items():
                self._say(f"{'':8s}   {name}: {share:.1%} zeros")

    def _write_outputs(self) -> dict:
        summary = report.summary(self.config, self.plan, self.history, self.sparsity,
                                 self.branch_epoch, self.seconds, self.run_dir,
                                 model_label(self.config, self.data))
        summary["world_size"] = self.world.size
        summary["examples"] = {split: len(getattr(self.data, f"y_{split}"))
                               for split in ("train", "val", "test")}
        summary["data"] = self.data.source
        if self.world.main:
            png = report.plot(self.plan, self.history, branch_epoch=self.branch_epoch,
                              title=f"DSD on {self.config.task} / {summary['model']} "
                                    f"({_pruning(self.config)}, seed "
                                    f"{self.config.seed})")
            outputs.write_final(self.run_dir, summary, self.sparsity, png)
        return summary

    def _say(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)


def _overall_sparsity(arm: Arm, world: World) -> float:
    zeros = torch.stack([(dsd_kernels.local_tensor(p.detach()) == 0).sum()
                         for _, p in arm.dsd.named_prunable]).sum()
    if world.shard:  # each rank counts the zeros of its slices
        world.sum_(zeros)
    return zeros.item() / sum(p.numel() for _, p in arm.dsd.named_prunable)


def _pruning(config: RunConfig) -> str:
    if config.masks == "zeros":
        return "the --init model's zeros"
    return f"pattern {config.pattern}" if config.pattern else f"sparsity {config.sparsity:g}"
