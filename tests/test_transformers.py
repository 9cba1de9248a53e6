"""DSDCallback inside the real transformers Trainer (CPU, a tiny BERT built from a config):
exact masks on weights and Adam state after every step, the re-dense LR composed with the
Trainer's scheduler, the other optim choices (rmsprop, adagrad, adafactor), bit-exact resume
from the Trainer's checkpoints, refusals."""

import math

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerState,
    TrainingArguments,
)

import dsd_kernels as dk
from dsd import Plan, prunable_parameters
from dsd.integrations.transformers import DSDCallback
from dsd_kernels.optim import LR_SCALE, step_lr

VOCAB, LENGTH, EXAMPLES, BATCH, LR = 64, 8, 96, 16, 1e-2
STEPS_PER_EPOCH = EXAMPLES // BATCH
STEP_PLAN = Plan.dsd(4, 4, 4, sparsity=0.5, unit="steps")
EPOCH_PLAN = Plan.dsd(1, 1, 1, sparsity=0.5)


@pytest.fixture(autouse=True)
def one_thread():
    """Ops this small run fastest on one thread, and far slower with a busy core to share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether the first token is in the upper half."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(1, VOCAB, (EXAMPLES, LENGTH), generator=generator)
        self.labels = (self.input_ids[:, 0] >= VOCAB // 2).long()

    def __len__(self):
        return EXAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    # No dropout: a resumed run then depends on the restored state alone, not on RNG replay.
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def make_trainer(output_dir, dsd_callback, *callbacks, optimizer=None, trainer_kwargs=None,
                 **args):
    """A Trainer running `dsd_callback`'s plan to its end, with `callbacks` after it;
    `optimizer` builds the optimizer from the model (None: the Trainer's own)."""
    plan = dsd_callback.plan
    model = tiny_bert()
    length = {"max_steps" if plan.unit == "steps" else "num_train_epochs": plan.total}
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True,
                    save_strategy="no", dataloader_num_workers=0, seed=0,
                    per_device_train_batch_size=BATCH, learning_rate=LR, **length)
    settings.update(args)
    optimizers = (None if optimizer is None else optimizer(model), None)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=Tokens(),
                   callbacks=[dsd_callback, *callbacks], optimizers=optimizers,
                   **(trainer_kwargs or {}))


def pruned_by_sorting(weight, sparsity):
    """Oracle: the floor(sparsity * N) smallest |w|, ties to the lower flat index."""
    order = torch.sort(weight.abs().flatten(), stable=True).indices
    pruned = torch.zeros(weight.numel(), dtype=torch.bool)
    pruned[order[:math.floor(sparsity * weight.numel())]] = True
    return pruned.view_as(weight)


class Probe(transformers.TrainerCallback):
    """Checks what DSD promises around every optimizer step of an uninterrupted run; placed
    after DSDCallback, so it sees each step as the Trainer runs it."""

    def __init__(self, dsd_callback):
        self.dsd_callback = dsd_callback
        self.plan = dsd_callback.plan
        self.phase_of_step = []
        self.pruned = {}  # name -> the positions pruned entering the sparse phase
        self.previous_weights = {}
        self.reference = None  # a torch AdamW replaying one re-dense step at the scaled LR
        self.reference_checked = False

    def on_pre_optimizer_step(self, args, state, control, optimizer, lr_scheduler, **kwargs):
        dsd, raw = self.dsd_callback.dsd, optimizer.optimizer
        position = state.global_step if self.plan.unit == "steps" else math.floor(state.epoch)
        index = self.plan.phase_at(position)
        phase = self.plan.phases[index]
        assert dsd.phase_index == index and isinstance(raw, dk.MaskedAdamW)
        for group, lr in zip(raw.param_groups, lr_scheduler.get_last_lr(), strict=True):
            assert group["lr"] == lr  # the scheduler keeps owning lr ...
            assert step_lr(group) == lr * phase.lr_scale  # ... and the step scales it
        steps_in_phase = self.phase_of_step.count(index)
        self.phase_of_step.append(index)
        redense = index > 1 and phase.kind == "dense"
        if phase.kind == "sparse" and steps_in_phase == 0:  # pruned before this step's batch
            for name, p in dsd.named_prunable:
                self.pruned[name] = pruned_by_sorting(self.previous_weights[name], phase.sparsity)
                assert torch.equal(p.detach() == 0, self.pruned[name]), name
        if redense and steps_in_phase == 0:  # the mask is lifted, the weights not yet regrown
            assert raw.masks == {}
            for name, p in dsd.named_prunable:
                assert (p.detach()[self.pruned[name]] == 0).all(), name
        if redense and steps_in_phase == 1:  # Adam state is warm again: replay this step
            # Under a GradScaler (no clipping) the masked step unscales the gradients itself.
            scale = 1.0 if optimizer.scaler is None else optimizer.scaler.get_scale()
            self.reference = self._reference_step(raw, scale)

    def on_optimizer_step(self, args, state, control, optimizer, **kwargs):
        raw = optimizer.optimizer
        phase = self.plan.phases[self.phase_of_step[-1]]
        if phase.kind == "sparse":
            for name, p in self.dsd_callback.dsd.named_prunable:
                pruned = self.pruned[name]
                assert torch.equal(p.detach() == 0, pruned), name
                assert pruned.sum() == math.floor(phase.sparsity * p.numel()), name
                for moment in ("exp_avg", "exp_avg_sq"):
                    assert (raw.state[p][moment][pruned] == 0).all(), (name, moment)
        if self.reference is not None:
            reference, pairs = self.reference
            reference.step()
            for p, copy in pairs:
                torch.testing.assert_close(p.detach(), copy.detach(), rtol=1e-5, atol=1e-6)
            self.reference, self.reference_checked = None, True

    def on_step_end(self, args, state, control, **kwargs):
        self.previous_weights = {name: p.detach().clone()
                                 for name, p in self.dsd_callback.dsd.named_prunable}

    @staticmethod
    def _reference_step(raw, grad_scale):
        """torch.optim.AdamW on copies of the parameters, unscaled gradients and state, at the
        LR the masked step should use: the scheduler's lr x the re-dense factor."""
        groups, pairs = [], []
        for group in raw.param_groups:
            copies = []
            for p in group["params"]:
                copy = p.detach().clone().requires_grad_()
                copy.grad = p.grad / grad_scale
                copies.append(copy)
                pairs.append((p, copy))
            groups.append({"params": copies, "lr": step_lr(group), "betas": group["betas"],
                           "eps": group["eps"], "weight_decay": group["weight_decay"]})
        reference = torch.optim.AdamW(groups, foreach=False)
        for p, copy in pairs:
            reference.state[copy] = {key: value.clone() for key, value in raw.state[p].items()}
        return reference, pairs


def dsd_rows(trainer):
    return [row for row in trainer.state.log_history if "dsd/phase" in row]


def weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("source", ["trainer_adamw", "optimizer_cls_and_kwargs", "grad_scaler"])
def test_sparse_phase_keeps_weights_and_adam_state_zero_then_redense_scales_lr(tmp_path, source):
    dsd_callback = DSDCallback(STEP_PLAN)
    probe = Probe(dsd_callback)
    trainer_kwargs = {}
    if source == "optimizer_cls_and_kwargs":
        trainer_kwargs["optimizer_cls_and_kwargs"] = (dk.MaskedAdamW, {"lr": LR})
    # Accelerate makes a GradScaler for fp16 on a GPU only; given one on CPU, the Trainer
    # scales the loss and steps through the scaler, whose optimizer wrapper holds step methods
    # (without clipping, which would unscale only under fp16, the step gets grad_scale).
    args = {"max_grad_norm": 0.0} if source == "grad_scaler" else {}
    trainer = make_trainer(tmp_path, dsd_callback, probe, trainer_kwargs=trainer_kwargs, **args)
    if source == "grad_scaler":
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()

    assert probe.phase_of_step == [0] * 4 + [1] * 4 + [2] * 4 and probe.reference_checked
    if source == "grad_scaler":  # every step ran (a skipped one would have lowered the scale)
        assert trainer.optimizer.scaler.get_scale() == 2.0**10
    for name, p in dsd_callback.dsd.named_prunable:  # pruned weights regrew from 0
        if name.startswith("bert.encoder"):
            assert (p.detach()[probe.pruned[name]] != 0).any(), name
    rows = dsd_rows(trainer)
    assert [(row["step"], row["dsd/phase"], row["dsd/lr_scale"]) for row in rows] == [
        (0, 0.0, 1.0), (4, 1.0, 1.0), (8, 2.0, pytest.approx(0.1))]
    assert all(rows[1][f"dsd/sparsity/{name}"] == 0.5
               for name, _ in dsd_callback.dsd.named_prunable)


@pytest.mark.parametrize("optim, torch_class, state_key",
                         [("rmsprop", torch.optim.RMSprop, "square_avg"),
                          ("adagrad", torch.optim.Adagrad, "sum"),
                          # Its moments of a weight are factored (a row and a column): not
                          # shaped like the weight, they are left to it.
                          ("adafactor", transformers.optimization.Adafactor, None)])
def test_the_trainers_other_optim_choices_are_masked_in_place(tmp_path, optim, torch_class,
                                                              state_key):
    dsd_callback = DSDCallback(STEP_PLAN)
    checked, pruned = [], {}

    class SparseSteps(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            raw = optimizer.optimizer
            assert isinstance(raw, torch_class) and type(raw) is not torch_class
            for p, mask in raw.masks.items():  # pruned: weight +0.0, state as a fresh one's
                assert (p.detach()[~mask].view(torch.int32) == 0).all()
                pruned[p] = ~mask
                if state_key is not None:
                    fresh = raw.param_groups[0].get("initial_accumulator_value", 0.0)
                    assert (raw.state[p][state_key][~mask] == fresh).all()
            checked.append(len(raw.masks))

    trainer = make_trainer(tmp_path, dsd_callback, SparseSteps(), optim=optim)
    trainer.train()

    assert checked[4:8] == [len(list(dsd_callback.dsd.named_prunable))] * 4
    assert checked[8:] == [0] * 4  # re-dense: the masks are lifted ...
    assert sum(int((p.detach()[where] != 0).sum()) for p, where in pruned.items()) > \
        sum(int(where.sum()) for where in pruned.values()) // 2  # ... and the weights regrow


def test_epoch_plan_switches_at_epoch_boundaries_and_a_shorter_run_is_allowed(tmp_path):
    dsd_callback = DSDCallback(Plan.dsd(1, 1, 2, sparsity=0.5))  # 4 epochs; the Trainer runs 3
    probe = Probe(dsd_callback)
    trainer = make_trainer(tmp_path, dsd_callback, probe, num_train_epochs=3)
    trainer.train()
    assert probe.phase_of_step == [0] * 6 + [1] * 6 + [2] * 6 and probe.reference_checked
    assert [(row["epoch"], row["dsd/phase"]) for row in dsd_rows(trainer)] == [
        (0, 0.0), (1, 1.0), (2, 2.0)]


@pytest.mark.parametrize("plan, save_steps, resume_at, optimizer", [
    # The Trainer's AdamW: it drops optimizer.pt's masks on loading; they are recovered.
    (STEP_PLAN, 3, (6, 9), None),
    # A user's MaskedAdamW loads them. Resumed inside epochs 1 and 2 (8, 16) and between (12).
    (EPOCH_PLAN, 4, (8, 12, 16), lambda model: dk.MaskedAdamW(model.parameters(), lr=LR)),
], ids=["steps_trainer_adamw", "epochs_masked_adamw"])
def test_resume_from_a_checkpoint_ends_bit_exact(tmp_path, plan, save_steps, resume_at,
                                                 optimizer):
    full = make_trainer(tmp_path / "full", DSDCallback(plan), optimizer=optimizer,
                        save_strategy="steps", save_steps=save_steps)
    full.train()
    expected = weights(full)
    for step in resume_at:
        checkpoint = tmp_path / "full" / f"checkpoint-{step}"
        dsd_callback = DSDCallback(plan)
        resumed = make_trainer(tmp_path / f"resumed-{step}", dsd_callback, optimizer=optimizer)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        # The log history comes back with the checkpoint; the phase taken up is logged next,
        # then the same switches as in the uninterrupted run.
        loaded = len([row for row in TrainerState.load_from_json(
            checkpoint / "trainer_state.json").log_history if "dsd/phase" in row])
        rows = dsd_rows(resumed)
        done = step if plan.unit == "steps" else math.ceil(step / STEPS_PER_EPOCH)
        assert (rows[loaded]["step"], rows[loaded]["dsd/phase"]) == (step, plan.phase_at(done - 1))
        assert rows[:loaded] + rows[loaded + 1:] == dsd_rows(full)
        assert dsd_callback.dsd.phase_index == len(plan.phases) - 1
        for name, weight in weights(resumed).items():
            assert torch.equal(weight, expected[name]), (step, name)


def assert_untouched(trainer, dsd_callback, weights_before, optimizer_class):
    raw = trainer.optimizer.optimizer
    assert type(raw) is optimizer_class and dsd_callback.dsd is None
    assert all(LR_SCALE not in group for group in raw.param_groups)
    for name, weight in weights(trainer).items():
        assert torch.equal(weight, weights_before[name]), name


@pytest.mark.parametrize("plan, longer", [(STEP_PLAN, {"max_steps": 13}),
                                          (EPOCH_PLAN, {"num_train_epochs": 4})])
def test_a_trainer_longer_than_the_plan_is_refused_with_nothing_changed(tmp_path, plan, longer):
    dsd_callback = DSDCallback(plan)
    trainer = make_trainer(tmp_path, dsd_callback, **longer)
    before = weights(trainer)
    with pytest.raises(ValueError, match=r"would train (13 steps|4 epochs) but the plan has "
                                         r"(12|3)") as error:
        trainer.train()
    assert "\n" not in str(error.value)
    assert_untouched(trainer, dsd_callback, before, torch.optim.AdamW)


@pytest.mark.parametrize("optimizer, expected, message", [
    (lambda model: torch.optim.SparseAdam(model.parameters()), torch.optim.SparseAdam,
     "cannot mask .*SparseAdam.*optim="),
    # What optim="galore_adamw_layerwise" gives the Trainer: its updates run in hooks.
    (lambda model: transformers.trainer_pt_utils.LayerWiseDummyOptimizer(optimizer_dict={}),
     transformers.trainer_pt_utils.LayerWiseDummyOptimizer,
     "cannot mask .*LayerWiseDummyOptimizer.*during the backward pass"),
    (lambda model: Lomo(model.parameters(), lr=LR), None,
     "cannot mask lomo_optim.lomo.Lomo: it updates the weights during the backward pass"),
], ids=["sparseadam", "layerwise", "lomo"])
def test_an_optimizer_that_cannot_be_masked_is_refused_with_nothing_changed(tmp_path, optimizer,
                                                                            expected, message):
    dsd_callback = DSDCallback(STEP_PLAN)
    trainer = make_trainer(tmp_path, dsd_callback, optimizer=optimizer)
    before = weights(trainer)
    with pytest.raises(TypeError, match=message) as error:
        trainer.train()
    assert "\n" not in str(error.value)
    assert_untouched(trainer, dsd_callback, before, expected or Lomo)


class Lomo(torch.optim.SGD):
    """Stands for lomo-optim's Lomo (optim="lomo"), which updates weights during backward."""

    __module__ = "lomo_optim.lomo"


def test_a_pattern_plan_keeps_the_masked_tensors_nm_and_resumes(tmp_path):
    """Plan.dsd(..., pattern="2:4") with the Trainer's AdamW: every pruned tensor (Linear and
    embedding weights, dim 1 of 16 or 32) keeps 2 of every 4 along dim 1 after each sparse
    step; resumed mid-phase, the masks come back from the weights (the word embeddings'
    padding row, all zeros, keeps zeros) and the run ends bit-exact."""
    plan = Plan.dsd(4, 4, 4, pattern="2:4", unit="steps")
    checked = []

    class NMSteps(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            masks = optimizer.optimizer.masks
            for p, mask in masks.items():
                assert mask.reshape(-1, 4).sum(-1).eq(2).all()
                assert not p.detach()[~mask].any()
            checked.append(len(masks))

    dsd_callback = DSDCallback(plan)
    full = make_trainer(tmp_path / "full", dsd_callback, NMSteps(), save_strategy="steps",
                        save_steps=6)
    full.train()
    assert checked[4:8] == [len(dsd_callback.dsd.named_prunable)] * 4
    assert checked[:4] == checked[8:] == [0] * 4
    resumed = make_trainer(tmp_path / "resumed", DSDCallback(plan))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    expected = weights(full)
    for name, weight in weights(resumed).items():
        assert torch.equal(weight, expected[name]), name


def test_a_zeros_plan_keeps_the_models_zeros_and_a_resume_keeps_them(tmp_path):
    """Plan.from_lengths([6, 3], first="sparse", masks="zeros") on a tiny BERT whose prunable
    weights were half zeroed (a pruned checkpoint): after every sparse step the zeros are
    exactly those, as +0.0; resumed mid-phase into the Trainer's AdamW (which drops the
    masks), they come back from the zeros and the run ends bit-exact."""
    plan = Plan.from_lengths([6, 3], first="sparse", masks="zeros", unit="steps")
    checked = []

    def pruned(trainer):
        with torch.no_grad():
            for _, p in prunable_parameters(trainer.model):
                p.mul_(dk.magnitude_masks(p, 0.5))
        return {name: p.detach() == 0 for name, p in prunable_parameters(trainer.model)}

    class ZerosKept(transformers.TrainerCallback):
        def __init__(self, dsd_callback, zeros):
            self.dsd_callback, self.zeros = dsd_callback, zeros

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.dsd_callback.dsd.phase_index == 0:
                for name, p in prunable_parameters(model):
                    assert torch.equal(p.detach() == 0, self.zeros[name]), name
                    assert not p.detach()[self.zeros[name]].view(torch.int32).any(), name
                checked.append(state.global_step)

    dsd_callback = DSDCallback(plan)
    full = make_trainer(tmp_path / "full", dsd_callback, save_strategy="steps", save_steps=3)
    zeros = pruned(full)
    full.add_callback(ZerosKept(dsd_callback, zeros))
    full.train()
    assert set(dsd_callback.dsd.found_sparsity) == set(zeros)
    dsd_callback = DSDCallback(plan)
    resumed = make_trainer(tmp_path / "resumed", dsd_callback)
    pruned(resumed)  # as the user would build it; the checkpoint's weights replace these
    resumed.add_callback(ZerosKept(dsd_callback, zeros))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert checked == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    expected = weights(full)
    for name, weight in weights(resumed).items():
        assert torch.equal(weight, expected[name]), name
