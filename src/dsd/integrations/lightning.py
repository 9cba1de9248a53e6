"""DSD inside PyTorch Lightning's `Trainer.fit`, as a callback (pip install 'dsd[lightning]').

    from lightning.pytorch import Trainer
    from dsd import Plan
    from dsd.integrations.lightning import DSDCallback
    trainer = Trainer(max_epochs=30, callbacks=[DSDCallback(Plan.dsd(10, 10, 10))])
    trainer.fit(model)    # configure_optimizers returns e.g. SGD, AdamW, RMSprop, lion-pytorch's
                          # Lion (+ any scheduler): one that make_masked_ takes
"""

from ..plan import Plan
from ..runner import DSD
from . import phase_metrics, require

pl = require("lightning", "lightning.pytorch", "pytorch_lightning")


class DSDCallback(pl.Callback):
    """Carries out a `dsd.Plan` during `Trainer.fit`.

    When fitting starts, the optimizer that `configure_optimizers` returned (exactly one
    torch.optim.Optimizer that `dsd_kernels.optim.make_masked_` takes: SGD, Adam and AdamW
    get the fused masked step, torch.optim's others and third-party ones such as
    lion-pytorch's Lion their own step kept masked) is made masked in place, so its
    schedulers keep working and the re-dense LR factor multiplies whatever LR they set.
    Phases switch before the first batch of each phase: at the start of an epoch for plans in
    epochs, of an optimizer step (`trainer.global_step`) for plans in steps. Each switch logs
    the phase, its LR scale and the sparsity of every pruned layer to the trainer's loggers.

    The phase and the plan go into Lightning checkpoints; the masks go with the optimizer's
    state. `trainer.fit(model, ckpt_path=...)` takes the run up in the same phase with the same
    masks. Under DDP every rank prunes its own replica: the replicas are identical, so are the
    masks. Under ModelParallelStrategy with `fully_shard` (FSDP2) in `configure_model`, the
    masks are computed on the shards and saved, as DTensors, in the optimizer's part of the
    distributed checkpoint. `callback.dsd` is the `dsd.DSD` at work (None before fitting
    starts).

    Args:
        plan: the `dsd.Plan` to carry out; its unit (epochs or steps) says when phases switch.
            A plan with an N:M pattern (``Plan.dsd(..., pattern="2:4")``) masks N:M.

    Raises:
        TypeError: If `plan` is not a `dsd.Plan`; at fit start, as `dsd.DSD` for an optimizer
            that cannot be masked.
        ValueError: At fit start, if the strategy is FSDPStrategy (FSDP version 1, whose
            flattened shards hold no whole tensors), the Trainer would train past the plan
            (``max_epochs`` or ``max_steps`` over ``plan.total``), `configure_optimizers`
            returned other than one optimizer, or as `dsd.DSD`; on loading a checkpoint made
            with another plan.
            Nothing is changed when fitting is refused.

    Example::

        dsd_callback = DSDCallback(Plan.dsd(10, 10, 10, sparsity=0.5))
        trainer = Trainer(max_epochs=30, callbacks=[dsd_callback])
        trainer.fit(model)
        print(dsd_callback.dsd.sparsity())  # the share of zeros in each pruned tensor
    """

    def __init__(self, plan: Plan):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a dsd.Plan, got {type(plan).__name__}")
        self.plan = plan
        self.dsd: DSD | None = None
        self._restored: dict | None = None  # a checkpoint's state, loaded before fit start

    def on_fit_start(self, trainer, pl_module) -> None:
        # Runs after the optimizers exist and before a checkpoint's optimizer state is loaded,
        # so the masked optimizer's load_state_dict restores the masks.
        if isinstance(trainer.strategy, pl.strategies.FSDPStrategy):
            raise ValueError("DSDCallback cannot prune under FSDPStrategy (FSDP version 1): each "
                             "rank holds a slice of parameters flattened together, not whole "
                             "tensors; use ModelParallelStrategy with fully_shard (FSDP2) in "
                             "configure_model")
        self._check_length(trainer)
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"DSDCallback supports exactly one optimizer; configure_optimizers "
                             f"returned {len(optimizers)}")
        self.dsd = DSD(pl_module, optimizers[0], self.plan)
        # A LightningOptimizer imitates the class its optimizer had when it was wrapped:
        # wrapping anew makes `self.optimizers()` (manual optimization) a masked one too.
        trainer.strategy.optimizers = trainer.strategy.optimizers
        if self._restored is not None:
            self.dsd.load_state_dict(self._restored)
            self._restored = None

    def _check_length(self, trainer) -> None:
        """Refuse a Trainer that would train past the plan (shorter is fine: a run may go on
        later from its checkpoint)."""
        total, unit = self.plan.total, self.plan.unit
        if unit == "epochs":
            planned, limit = trainer.max_epochs, f"max_epochs={trainer.max_epochs}"
        elif trainer.max_steps != -1:
            planned, limit = trainer.max_steps, f"max_steps={trainer.max_steps}"
        else:
            planned = trainer.estimated_stepping_batches  # inf, or -1 if unknown
            limit = f"max_steps=-1 and max_epochs={trainer.max_epochs}"
        if planned < 0 or planned > total:
            raise ValueError(f"the Trainer ({limit}) would train past the DSD plan's {total} "
                             f"{unit}: set Trainer(max_{unit}=...) to at most {total}")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.plan.unit == "epochs":
            self._log_if_switched(trainer, self.dsd.epoch_start(trainer.current_epoch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Batches accumulated into one optimizer step share its global_step: only the first
        # one switches.
        if self.plan.unit == "steps":
            self._log_if_switched(trainer, self.dsd.step_start(trainer.global_step))

    def _log_if_switched(self, trainer, switched: bool) -> None:
        if not switched:
            return
        metrics = phase_metrics(self.dsd)
        for logger in trainer.loggers:  # as Lightning's own logging does, on every rank
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def state_dict(self) -> dict:
        if self.dsd is None:
            return {"phase_index": None, "plan": self.plan.to_dict()}
        return self.dsd.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        # Most strategies restore callbacks before fit start (no DSD yet); FSDP and DeepSpeed
        # restore them after it.
        saved = Plan.from_dict(state_dict["plan"])
        if saved != self.plan:
            raise ValueError(f"the checkpoint was made with another DSD plan ({saved}); resume "
                             "it with that plan")
        if self.dsd is None:
            self._restored = state_dict
        else:
            self.dsd.load_state_dict(state_dict)
