"""DSD inside the Hugging Face `Trainer`: a `TrainerCallback` that carries out a `dsd.Plan`.

    from dsd import Plan
    from dsd.integrations.transformers import DSDCallback   # pip install 'dsd[transformers]'

    plan = Plan.dsd(300, 300, 300, sparsity=0.5, unit="steps")  # or epochs, the default
    trainer = Trainer(model, args, train_dataset=data, callbacks=[DSDCallback(plan)])
    trainer.train()          # or trainer.train(resume_from_checkpoint=True)

The Trainer's optimizer (any `optim` choice that builds a torch.optim.Optimizer
`make_masked_` takes: the default AdamW, "sgd", "rmsprop", "adagrad", "adafactor", ...; or one
passed as `optimizers=(MaskedAdamW(...), None)` or `optimizer_cls_and_kwargs=(MaskedAdamW,
{...})`) is made masked in place when training begins; `train(resume_from_checkpoint=...)`
takes up the phase and the masks of the checkpoint. Each phase switch adds a row to
`state.log_history`.
"""

import logging
import math
import sys

import torch

from ..plan import Plan
from ..runner import DSD
from . import phase_metrics, require

transformers = require("transformers", "transformers")
accelerate_optimizer = require("transformers", "accelerate.optimizer")

logger = logging.getLogger(__name__)

trainer_pt_utils = require("transformers", "transformers.trainer_pt_utils")


class DSDCallback(transformers.TrainerCallback):
    """Runs `plan` inside `transformers.Trainer`: `Trainer(..., callbacks=[DSDCallback(plan)])`.

    - Train begin: the Trainer's optimizer (inside Accelerate's wrapper) is made masked in
      place by `dsd_kernels.optim.make_masked_`, so the Trainer's LR scheduler, GradScaler and
      checkpoints keep working. A Trainer that would train longer than the plan (max_steps or
      num_train_epochs over `plan.total`), an optimizer `make_masked_` refuses (e.g.
      SparseAdam), or an `optim` choice that updates the weights during the backward pass
      (the layer-wise GaLore/APOLLO ones, LOMO) is refused first, with nothing changed.
    - Phases switch before the first batch of the new phase: at `on_step_begin` (plans in
      steps, at `state.global_step`) or `on_epoch_begin` (plans in epochs, the Trainer's
      0-based epoch). The re-dense LR factor multiplies the scheduler's `lr` in the masked
      step (`dsd_kernels.optim.step_lr`); the Trainer's logged `learning_rate` is the
      scheduler's own.
    - Resume: on `train(resume_from_checkpoint=...)` the phase is taken from the restored
      step or epoch count, without pruning again. A masked optimizer (given by the user)
      loads its masks from optimizer.pt; the Trainer's own torch optimizer drops them on
      loading, and they are recovered from the exact zeros of the restored weights.
    - Each switch (and each resume) appends `dsd.integrations.phase_metrics` (phase, LR
      scale, sparsity per prunable tensor, under "dsd/...") with "step" and "epoch" to
      `state.log_history`, which checkpoints keep in trainer_state.json, and logs a line at
      INFO level on logger "dsd.integrations.transformers".
    - Under Accelerate's FSDP version 2 the model's parameters are DTensors: the masks are
      computed on the shards; FSDP version 1, whose flattened shards hold no whole tensors,
      is refused at train begin.

    `callback.dsd` is the `dsd.DSD` of the current training run (None before it begins).

    Args:
        plan: the `dsd.Plan` to carry out; its unit (epochs or steps) says when phases switch.
            A plan with an N:M pattern (``Plan.dsd(..., pattern="2:4")``) masks N:M.

    Raises:
        TypeError: If `plan` is not a `dsd.Plan`; at train begin, if the optimizer cannot be
            masked (the message says why and names the ``optim`` setting).
        ValueError: At train begin, under FSDP version 1, if the Trainer would train past the
            plan, a plan in epochs meets a train dataset without a length, or as `dsd.DSD`
            (patterns, frozen parameters); on resume, if the checkpoint's masks cannot be
            recovered.

    Example::

        plan = Plan.dsd(300, 300, 300, sparsity=0.5, unit="steps")
        trainer = Trainer(model, TrainingArguments(max_steps=900, ...), train_dataset=data,
                          callbacks=[DSDCallback(plan)])
        trainer.train()
    """

    def __init__(self, plan: Plan):
        if not isinstance(plan, Plan):
            raise TypeError(f"DSDCallback takes a dsd.Plan, got {type(plan).__name__}")
        self.plan = plan
        self.dsd: DSD | None = None
        self._next_epoch = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_fsdp_version_1(model)
        self._check_length(state)
        raw_optimizer = _unwrap(optimizer)
        _refuse_updates_outside_the_step(raw_optimizer)
        try:
            self.dsd = DSD(model, raw_optimizer, self.plan)
        except TypeError as error:
            optim = getattr(args.optim, "value", args.optim)  # an OptimizerNames member
            raise TypeError(f"{error} (the Trainer's optimizer: TrainingArguments(optim="
                            f"{optim!r}), or the one passed as optimizers=)") from None
        _point_scaler_steps_at(optimizer)
        # A fresh run starts at 0; a resumed one at the epoch the Trainer takes up, the one
        # its restored state.epoch lies in (the next one when that epoch was finished).
        self._next_epoch = math.floor(state.epoch)
        if state.global_step > 0:
            # Checkpoints count whole optimizer steps; one taken inside an epoch counts that
            # epoch as done, and the epoch then continues in its phase.
            done = state.global_step if self.plan.unit == "steps" else math.ceil(state.epoch)
            self.dsd.resume(done)
            self._record(state, "resumed in")

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.plan.unit == "epochs":
            epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
            if self.dsd.epoch_start(epoch):
                self._record(state, "entered")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.plan.unit == "steps" and self.dsd.step_start(state.global_step):
            self._record(state, "entered")

    def _check_length(self, state) -> None:
        """Refuse a Trainer that would run past the plan (it has no phase there)."""
        if self.plan.unit == "steps":
            length, setting = state.max_steps, "max_steps"
        elif state.num_train_epochs == sys.maxsize:
            raise ValueError("DSDCallback: the train dataset has no length, so the Trainer "
                             "counts no epochs; use a plan with unit='steps' and max_steps")
        else:
            length, setting = state.num_train_epochs, "num_train_epochs"
        if length > self.plan.total:
            raise ValueError(f"DSDCallback: the Trainer would train {length} {self.plan.unit} "
                             f"but the plan has {self.plan.total}; lower {setting} or lengthen "
                             "the plan")

    def _record(self, state, event: str) -> None:
        metrics = phase_metrics(self.dsd)
        state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        if state.is_world_process_zero:
            phase = self.dsd.phase
            pruning = "the model's zeros kept" if phase.masks == "zeros" else \
                f"pattern {phase.pattern}" if phase.pattern else f"sparsity {phase.sparsity:g}"
            logger.info("DSD %s phase %d (%s, %s, LR x %g) at step %d, epoch %.2f",
                        event, self.dsd.phase_index, phase.kind, pruning, phase.lr_scale,
                        state.global_step, state.epoch)


def _refuse_fsdp_version_1(model) -> None:
    """FSDP version 1 (FullyShardedDataParallel) shards flattened parameters: no rank holds
    whole tensors, or whole rows of them, to rank magnitudes in."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError("DSDCallback cannot prune under FSDP version 1: each rank holds a slice "
                         "of parameters flattened together, not whole tensors; use FSDP2: "
                         "TrainingArguments(fsdp_config={'fsdp_version': 2, ...})")


def _refuse_updates_outside_the_step(optimizer) -> None:
    """The layer-wise optim choices (GaLore's, APOLLO's) and LOMO update each parameter in a
    hook during the backward pass, outside the optimizer step that the masks wrap."""
    kind = type(optimizer)
    if isinstance(optimizer, trainer_pt_utils.LayerWiseDummyOptimizer) or \
            kind.__module__.split(".")[0] == "lomo_optim":
        raise TypeError(f"cannot mask {kind.__module__}.{kind.__qualname__}: it updates the "
                        "weights during the backward pass (as optim='lomo', 'adalomo' and the "
                        "'*_layerwise' choices do), outside the optimizer step that dsd masks, "
                        "so pruned weights would regrow")


def _unwrap(optimizer):
    """The torch optimizer inside Accelerate's AcceleratedOptimizer."""
    while isinstance(optimizer, accelerate_optimizer.AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _point_scaler_steps_at(optimizer) -> None:
    """With a GradScaler, an AcceleratedOptimizer keeps the step method of its optimizer from
    when it was wrapped; taken before the optimizer became masked, that step refuses to run.
    Take the step it has now, as Accelerate does when it wraps one."""
    while isinstance(optimizer, accelerate_optimizer.AcceleratedOptimizer):
        if optimizer.scaler is not None:
            step = optimizer.optimizer.step
            optimizer._optimizer_original_step_method = step
            optimizer._optimizer_patched_step_method = (
                accelerate_optimizer.patch_optimizer_step(optimizer, step))
        optimizer = optimizer.optimizer
