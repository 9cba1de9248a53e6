"""DSDCallback in real Lightning fits on CPU: pruned weights and their optimizer state exactly 0
after every step of a sparse phase, regrowth from 0 at re-dense with the plan's LR factor times
the scheduler's LR, phase metrics in the loggers, optimizers beyond SGD/Adam/AdamW (torch's
RMSprop, lion-pytorch's Lion), manual optimization and gradient accumulation, bit-exact resume
from a checkpoint, DDP on 2 processes, one-line errors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import lion_pytorch
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

import dsd_kernels as dk
from dsd import Plan
from dsd.integrations.lightning import DSDCallback
from dsd_kernels.optim import step_lr

from _lightning_net import BATCHES_PER_EPOCH, PRUNABLE, QUIET, STATE_NAMES, Net, loader, lr_factor

pytestmark = [  # Lightning's: its own use of torch, and resuming into the same directory
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")]

SPARSITY = 0.5
FACTOR = 0.1


class MemoryLogger(Logger):
    """Keeps what is logged, (step, metrics) per call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class Recorder(L.Callback):
    """Around every optimizer step: the phase, LRs and gradients the step uses, then the weights,
    optimizer state and masks it leaves. Also the phase at every batch start. Listed after the
    DSDCallback, so it sees each batch after DSD's switch."""

    def __init__(self, dsd_callback, state_names):
        self.dsd_callback, self.state_names = dsd_callback, state_names
        self.steps, self.batch_starts, self._pending = [], [], None

    def _prunable(self):
        return dict(self.dsd_callback.dsd.named_prunable)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_starts.append((trainer.global_step, self.dsd_callback.dsd.phase_index))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = optimizer.param_groups[0]
        self._pending = dict(
            epoch=trainer.current_epoch, step=trainer.global_step,
            phase=self.dsd_callback.dsd.phase_index, lr=group["lr"], step_lr=step_lr(group),
            before={n: p.detach().clone() for n, p in self._prunable().items()},
            grads={n: p.grad.clone() for n, p in self._prunable().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._pending is None:  # an accumulating batch: no step
            return
        optimizer = trainer.strategy.optimizers[0]
        masks = optimizer.masks
        self._pending.update(
            after={n: p.detach().clone() for n, p in self._prunable().items()},
            state={n: {k: optimizer.state[p][k].clone() for k in self.state_names}
                   for n, p in self._prunable().items()},
            masks={n: masks.get(p) for n, p in self._prunable().items()})
        self.steps.append(self._pending)
        self._pending = None


def _fit(model, plan, *, callbacks=(), ckpt_path=None, **trainer_settings):
    """Fit `model` under `plan`; returns the DSDCallback and a Recorder of the run."""
    dsd_callback = DSDCallback(plan)
    recorder = Recorder(dsd_callback, STATE_NAMES.get(model.kind, ()))
    settings = dict(QUIET, **trainer_settings)
    trainer = L.Trainer(callbacks=[dsd_callback, recorder, *callbacks], **settings)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return dsd_callback, recorder


def _resume(model, plan, checkpoint, max_epochs):
    """Fit `model` under `plan` from `checkpoint`'s last file up to `max_epochs`."""
    return _fit(model, plan, callbacks=[ModelCheckpoint(checkpoint.dirpath)],
                ckpt_path=checkpoint.last_model_path, enable_checkpointing=True,
                max_epochs=max_epochs)


def _smallest(weight, k):
    """Oracle: True where |weight| is not among its k smallest (by sorting)."""
    magnitude = weight.abs().flatten()
    kept = torch.ones_like(magnitude, dtype=torch.bool)
    kept[magnitude.argsort()[:k]] = False
    return kept.view_as(weight)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_sparse_phase_keeps_weights_and_state_zero_then_redense_regrows(kind):
    L.seed_everything(0, verbose=False)
    plan = Plan.dsd(2, 2, 2, sparsity=SPARSITY, redense_lr_factor=FACTOR)
    logger = MemoryLogger()
    model = Net(kind, scheduler="epoch")
    _, recorder = _fit(model, plan, max_epochs=plan.total, logger=logger)
    masked_class = {"sgd": dk.MaskedSGD, "adam": dk.MaskedAdam, "adamw": dk.MaskedAdamW}[kind]
    assert type(model.optimizer_made) is masked_class  # the same object, converted
    steps = recorder.steps
    assert len(steps) == plan.total * BATCHES_PER_EPOCH
    assert [s["phase"] for s in steps] == [plan.phase_at(s["epoch"]) for s in steps]
    base_lr = 0.1 if kind == "sgd" else 0.01
    for s in steps:  # StepLR keeps owning lr; the step uses lr times the phase's scale
        assert s["lr"] == pytest.approx(base_lr * 0.8 ** s["epoch"], rel=1e-12)
        assert s["step_lr"] == pytest.approx(s["lr"] * plan.phases[s["phase"]].lr_scale, rel=1e-12)

    dense, sparse, redense = ([s for s in steps if s["phase"] == i] for i in range(3))
    assert all(mask is None for s in dense + redense for mask in s["masks"].values())
    for name in PRUNABLE:
        k = math.floor(SPARSITY * dense[-1]["after"][name].numel())
        kept = _smallest(dense[-1]["after"][name], k)
        for s in sparse:
            assert torch.equal(s["masks"][name], kept), name
            assert int((s["after"][name] == 0).sum()) == k, name
            assert int((s["grads"][name][~kept] != 0).sum()) > 0  # the mask, not the gradient
            for state_name, value in s["state"][name].items():
                assert int((value[~kept] != 0).sum()) == 0, (name, state_name)
        # Re-dense: the pruned weights start from 0 with 0 state, and regrow.
        first = redense[0]
        assert int((first["before"][name][~kept] != 0).sum()) == 0
        assert int((first["after"][name][~kept] != 0).sum()) > k // 2
        grad = first["grads"][name][~kept]
        fresh = {"momentum_buffer": grad, "exp_avg": 0.1 * grad, "exp_avg_sq": 0.001 * grad ** 2}
        for state_name, value in first["state"][name].items():
            torch.testing.assert_close(value[~kept], fresh[state_name], rtol=1e-5, atol=1e-12)

    # One row per phase start, logged before its first step.
    rows = [(step, metrics) for step, metrics in logger.rows if "dsd/phase" in metrics]
    assert [step for step, _ in rows] == [start * BATCHES_PER_EPOCH for start in plan.starts]
    assert [m["dsd/phase"] for _, m in rows] == [0.0, 1.0, 2.0]
    assert [m["dsd/lr_scale"] for _, m in rows] == [1.0, 1.0, FACTOR]
    for name in PRUNABLE:
        pruned = math.floor(SPARSITY * dense[-1]["after"][name].numel()) / \
            dense[-1]["after"][name].numel()
        assert [m[f"dsd/sparsity/{name}"] for _, m in rows] == [0.0, pruned, pruned]


def test_the_step_uses_plan_factor_times_scheduler_lr():
    """Plain SGD: each update is -lr * grad, so the LR the step used can be read off it."""
    L.seed_everything(0, verbose=False)
    plan = Plan.dsd(1, 1, 1, sparsity=SPARSITY, redense_lr_factor=FACTOR)
    _, recorder = _fit(Net("sgd0", scheduler="step"), plan, max_epochs=plan.total)
    for s in recorder.steps:
        expected = 0.5 * lr_factor(s["step"]) * plan.phases[s["phase"]].lr_scale
        for name in PRUNABLE:
            kept = s["after"][name] != 0
            torch.testing.assert_close((s["after"][name] - s["before"][name])[kept],
                                       -expected * s["grads"][name][kept], rtol=1e-4, atol=1e-7)
    assert {s["phase"] for s in recorder.steps} == {0, 1, 2}


class OtherNet(Net):
    """Net whose configure_optimizers returns another optimizer than SGD, Adam and AdamW."""

    OPTIMIZERS = {  # kind: (class, keyword arguments, its parameter-shaped state)
        "rmsprop": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5),
                    ("square_avg", "momentum_buffer")),
        "lion": (lion_pytorch.Lion, dict(lr=1e-3, weight_decay=1e-2), ("exp_avg",)),
        "sparseadam": (torch.optim.SparseAdam, dict(lr=0.01), ()),
    }

    def configure_optimizers(self):
        cls, kwargs, _ = self.OPTIMIZERS[self.kind]
        self.optimizer_made = cls(self.parameters(), **kwargs)
        scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer_made, 1, gamma=0.8)
        return {"optimizer": self.optimizer_made, "lr_scheduler": scheduler}


@pytest.mark.parametrize("kind", ["rmsprop", "lion"])
def test_other_optimizers_keep_pruned_weights_at_zero_and_state_fresh_then_regrow(kind):
    """Their own step between dsd's passes: every sparse step leaves pruned weights +0.0 and
    their state as a fresh optimizer's (0 here), whatever the gradient there; re-dense
    regrows them."""
    L.seed_everything(0, verbose=False)
    plan = Plan.dsd(1, 1, 1, sparsity=SPARSITY)
    cls, _, state_names = OtherNet.OPTIMIZERS[kind]
    model = OtherNet(kind)
    dsd_callback = DSDCallback(plan)
    recorder = Recorder(dsd_callback, state_names)
    L.Trainer(callbacks=[dsd_callback, recorder], max_epochs=plan.total, **QUIET).fit(
        model, loader())
    assert isinstance(model.optimizer_made, cls) and type(model.optimizer_made) is not cls
    dense, sparse, redense = ([s for s in recorder.steps if s["phase"] == i] for i in range(3))
    assert len(sparse) == len(redense) == BATCHES_PER_EPOCH
    for name in PRUNABLE:
        pruned = ~sparse[0]["masks"][name]
        assert int(pruned.sum()) == math.floor(SPARSITY * pruned.numel())
        for s in sparse:
            assert torch.equal(s["masks"][name], ~pruned)
            assert (s["grads"][name][pruned] != 0).any()  # the mask, not the gradient
            assert (s["after"][name][pruned].view(torch.int32) == 0).all(), name  # +0.0
            for state_name, value in s["state"][name].items():
                assert (value[pruned] == 0).all(), (name, state_name)
        assert all(mask is None for s in redense for mask in s["masks"].values())
        assert (redense[-1]["after"][name][pruned] != 0).sum() > pruned.sum() // 2, name


class ManualNet(Net):
    """Manual optimization: steps `self.optimizers()` itself."""

    def __init__(self, optimizer="adam", optimizers=1):
        super().__init__(optimizer)
        self.automatic_optimization = False
        self.count = optimizers
        self.wrapper_classes = []

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.wrapper_classes.append(type(optimizer))
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()

    def configure_optimizers(self):
        if self.count == 1:
            return super().configure_optimizers()
        self.optimizer_made = [torch.optim.SGD(self.parameters(), lr=0.1)
                               for _ in range(self.count)]
        return self.optimizer_made


def _check_step_plan(plan, recorder, state_names):
    """Every batch starts in the phase of its optimizer step; sparse steps keep exact zeros."""
    assert [phase for _, phase in recorder.batch_starts] == \
        [plan.phase_at(step) for step, _ in recorder.batch_starts]
    sparse = [s for s in recorder.steps if plan.phases[s["phase"]].kind == "sparse"]
    assert sparse
    for s in sparse:
        for name in PRUNABLE:
            pruned = ~s["masks"][name]
            assert int(pruned.sum()) == math.floor(SPARSITY * pruned.numel())
            assert int((s["after"][name][pruned] != 0).sum()) == 0
            for state_name in state_names:
                assert int((s["state"][name][state_name][pruned] != 0).sum()) == 0


def test_manual_optimization_steps_the_masked_optimizer():
    L.seed_everything(0, verbose=False)
    plan = Plan.dsd(3, 4, 3, sparsity=SPARSITY, unit="steps")
    model = ManualNet("adam")
    _, recorder = _fit(model, plan, max_steps=plan.total)
    assert len(recorder.steps) == plan.total
    assert all(issubclass(cls, dk.MaskedAdam) for cls in model.wrapper_classes)
    _check_step_plan(plan, recorder, STATE_NAMES["adam"])


def test_step_plan_with_gradient_accumulation_switches_before_the_first_batch():
    L.seed_everything(0, verbose=False)
    plan = Plan.dsd(3, 2, 2, sparsity=SPARSITY, unit="steps")  # 2 steps an epoch
    _, recorder = _fit(Net("sgd"), plan, max_steps=plan.total, accumulate_grad_batches=2)
    assert len(recorder.batch_starts) == 2 * plan.total
    assert [s["step"] for s in recorder.steps] == list(range(plan.total))
    _check_step_plan(plan, recorder, STATE_NAMES["sgd"])


@pytest.mark.parametrize("unit,kind", [("epochs", "adam"), ("steps", "sgd")])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, unit, kind):
    """Stopped in the middle of the sparse phase, then of the re-dense phase, and resumed each
    time in a new model and Trainer. Both plans span 5 epochs of 4 steps (4+8+8 steps; 1+2+2
    epochs); the pieces end at epochs 2 and 4. They are bounded by max_epochs: Lightning itself
    replays a batch when it resumes a max_steps run from an epoch end's checkpoint (plain
    Lightning without DSD does the same)."""
    plan = Plan.dsd(*((1, 2, 2) if unit == "epochs" else (4, 8, 8)), sparsity=SPARSITY,
                    unit=unit)
    scheduler = "epoch" if unit == "epochs" else "step"
    L.seed_everything(0, verbose=False)
    straight = Net(kind, scheduler)
    _fit(straight, plan, max_epochs=5)

    L.seed_everything(0, verbose=False)
    resumed, ckpt_path = Net(kind, scheduler), None
    for stop in (2, 4, 5):
        if ckpt_path is not None:  # a new process would start from other weights
            L.seed_everything(1, verbose=False)
            resumed = Net(kind, scheduler)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        dsd_callback, recorder = _fit(resumed, plan, callbacks=[checkpoint], ckpt_path=ckpt_path,
                                      enable_checkpointing=True, max_epochs=stop)
        ckpt_path = checkpoint.last_model_path
        done = stop if unit == "epochs" else stop * BATCHES_PER_EPOCH
        assert dsd_callback.dsd.phase_index == plan.phase_at(done - 1)
        assert len(recorder.steps) == BATCHES_PER_EPOCH * (stop - {2: 0, 4: 2, 5: 4}[stop])
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_checkpoint_of_another_plan_is_refused(tmp_path):
    L.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(Net("sgd"), Plan.dsd(1, 1, 1), callbacks=[checkpoint], enable_checkpointing=True,
         max_epochs=2)
    model = Net("sgd")
    with pytest.raises(ValueError, match="made with another DSD plan") as error:
        _resume(model, Plan.dsd(1, 1, 1, sparsity=0.3), checkpoint, max_epochs=3)
    assert "\n" not in str(error.value)
    assert model.optimizer_made is None  # refused before the optimizer was made


@pytest.mark.parametrize("model,plan,limits,error,message", [
    (lambda: ManualNet(optimizers=2), Plan.dsd(1, 1, 1), dict(max_epochs=3), ValueError,
     "exactly one optimizer; configure_optimizers returned 2"),
    (lambda: OtherNet("sparseadam"), Plan.dsd(1, 1, 1), dict(max_epochs=3), TypeError,
     "cannot mask torch.optim.sparse_adam.SparseAdam"),
    (lambda: Net("sgd"), Plan.dsd(2, 2, 2), dict(max_epochs=7), ValueError,
     r"Trainer \(max_epochs=7\) would train past the DSD plan's 6 epochs: set "
     r"Trainer\(max_epochs=...\) to at most 6"),
    (lambda: Net("sgd"), Plan.dsd(2, 2, 2), dict(max_epochs=-1, max_steps=8), ValueError,
     r"max_epochs=-1\) would train past"),
    (lambda: Net("sgd"), Plan.dsd(3, 4, 3, unit="steps"), dict(max_steps=11), ValueError,
     r"max_steps=11\) would train past the DSD plan's 10 steps"),
    (lambda: Net("sgd"), Plan.dsd(3, 4, 3, unit="steps"), dict(max_epochs=3), ValueError,
     r"max_steps=-1 and max_epochs=3\) would train past the DSD plan's 10 steps"),
], ids=["two-optimizers", "sparseadam", "max-epochs", "no-epoch-limit", "max-steps",
        "epochs-of-a-step-plan"])
def test_what_it_cannot_run_is_a_one_line_error_with_nothing_modified(model, plan, limits,
                                                                     error, message):
    L.seed_everything(0, verbose=False)
    model = model()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(error, match=message) as raised:
        _fit(model, plan, **limits)
    assert "\n" not in str(raised.value)
    made = model.optimizer_made if isinstance(model.optimizer_made, list) else \
        [model.optimizer_made]
    assert all(type(optimizer).__module__.startswith("torch.optim") for optimizer in made)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name


def test_plan_must_be_a_plan():
    with pytest.raises(TypeError, match="plan must be a dsd.Plan, got dict"):
        DSDCallback({"phases": []})


@pytest.mark.slow  # two processes
def test_ddp_ranks_have_the_same_masks_and_weights(tmp_path):
    script = Path(__file__).with_name("_lightning_ddp.py")
    # The pure-torch kernels: two new processes must not each wait for a C++ build.
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=240, env=dict(os.environ, DSD_BACKEND="torch"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    for name in PRUNABLE:
        mask = ranks[0]["masks"][name]
        assert int((~mask).sum()) == math.floor(SPARSITY * mask.numel())
        assert torch.equal(ranks[1]["masks"][name], mask), name
    for name, value in ranks[0]["state_dict"].items():
        assert torch.equal(ranks[1]["state_dict"][name], value), name
        assert not torch.equal(ranks[0]["initial"][name], value), name  # it trained


def test_a_pattern_plan_keeps_the_masked_tensors_nm_and_goes_into_the_checkpoint(tmp_path):
    """Plan.dsd(..., pattern="2:4"): every group of 4 along dim 1 of each pruned tensor keeps
    2 after every sparse step, before and after a resume from a checkpoint, which refuses the
    unstructured plan of the same sparsity."""
    plan = Plan.dsd(1, 2, 1, pattern="2:4")
    L.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, first = _fit(Net("adamw"), plan, callbacks=[checkpoint], enable_checkpointing=True,
                    max_epochs=2)
    with pytest.raises(ValueError, match="made with another DSD plan"):
        _resume(Net("adamw"), Plan.dsd(1, 2, 1, sparsity=0.5), checkpoint, max_epochs=4)
    _, resumed = _resume(Net("adamw"), plan, checkpoint, max_epochs=4)
    sparse = [s for s in first.steps + resumed.steps if s["phase"] == 1]
    assert len(sparse) == 2 * BATCHES_PER_EPOCH
    for s in sparse:
        for name in PRUNABLE:
            mask, weight = s["masks"][name], s["after"][name]
            assert mask.reshape(-1, 4).sum(-1).eq(2).all(), name
            assert (weight != 0).reshape(-1, 4).sum(-1).le(2).all(), name
            assert not weight[~mask].any(), name
    assert all(mask is None for mask in resumed.steps[-1]["masks"].values())  # re-dense


def test_a_zeros_plan_keeps_the_models_zeros_and_a_resume_keeps_them(tmp_path):
    """Plan.from_lengths([2, 1], first="sparse", masks="zeros") on a Net whose prunable
    weights were half zeroed (a pruned checkpoint): every sparse step, before and after a
    resume from the checkpoint, keeps exactly those zeros as +0.0; re-dense regrows them."""
    plan = Plan.from_lengths([2, 1], first="sparse", masks="zeros")

    def pruned():
        L.seed_everything(0, verbose=False)
        net = Net("adamw")
        with torch.no_grad():
            for name in PRUNABLE:
                net.get_parameter(name).mul_(dk.magnitude_masks(net.get_parameter(name), 0.5))
        return net

    zeros = {name: pruned().get_parameter(name) == 0 for name in PRUNABLE}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first_callback, first = _fit(pruned(), plan, callbacks=[checkpoint],
                                 enable_checkpointing=True, max_epochs=1)
    assert first_callback.dsd.found_sparsity == {name: 0.5 for name in PRUNABLE}
    _, resumed = _resume(pruned(), plan, checkpoint, max_epochs=3)
    sparse = [s for s in first.steps + resumed.steps if s["phase"] == 0]
    assert len(sparse) == 2 * BATCHES_PER_EPOCH
    for s in sparse:
        for name in PRUNABLE:
            assert torch.equal(s["masks"][name], ~zeros[name]), name
            assert not s["after"][name][zeros[name]].view(torch.int32).any(), name
    last = resumed.steps[-1]
    for name in PRUNABLE:
        assert last["masks"][name] is None and last["after"][name][zeros[name]].all(), name
