"""DSD in any training loop: pick the prunable parameters, take over the optimizer, and switch
phases (prune at the start of a sparse phase, lift the mask at re-dense, scale the LR).

    dsd = DSD(model, optimizer, Plan.dsd(10, 10, 10, sparsity=0.5))
    optimizer = dsd.optimizer            # the masked optimizer: step this one from now on
    for epoch in range(dsd.plan.total):
        dsd.epoch_start(epoch)
        ...  # the usual batches: loss.backward(); optimizer.step()
"""

import fnmatch
import inspect

import torch
from torch import nn

import dsd_kernels
from dsd_kernels.optim import MaskedAdam, MaskedAdamW, MaskedSGD

from .plan import Plan

# Modules whose `weight`-named parameters are pruned by default (the paper prunes these; biases
# and normalisation parameters are few and sensitive).
_PRUNABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.Embedding)
_MASKED = (MaskedSGD, MaskedAdam, MaskedAdamW)
_MASKED_FOR = {torch.optim.SGD: MaskedSGD, torch.optim.Adam: MaskedAdam,
               torch.optim.AdamW: MaskedAdamW}


def prunable_parameters(model: nn.Module, include=(),
                        exclude=()) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs to prune, in `model.named_parameters()` order.

    Default: weight tensors of Linear, Conv*, RNN/LSTM/GRU and Embedding layers. `include`
    (fnmatch patterns on full parameter names) replaces the default; `exclude` removes
    matches. A pattern that matches no parameter is an error (it is most likely a typo).
    """
    named = list(model.named_parameters())
    for pattern in tuple(include) + tuple(exclude):
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
            raise ValueError(f"the pattern {pattern!r} matches no parameter of the model; "
                             f"its parameters are: {', '.join(name for name, _ in named)}")
    if include:
        chosen = {name for name, _ in named
                  if any(fnmatch.fnmatchcase(name, pattern) for pattern in include)}
    else:
        chosen = set()
        for module_name, module in model.named_modules():
            if isinstance(module, _PRUNABLE_MODULES):
                prefix = f"{module_name}." if module_name else ""
                chosen.update(prefix + name for name, _ in module.named_parameters(recurse=False)
                              if name.startswith("weight"))
    chosen = {name for name in chosen
              if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)}
    selected = [(name, p) for name, p in named if name in chosen]
    if not selected:
        raise ValueError("no prunable parameter selected: the model has no Linear, Conv, RNN or "
                         "Embedding weight, or include/exclude left none")
    return selected


def masked_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer as a dsd_kernels masked optimizer, whose fused step keeps pruned weights
    AND their momentum / Adam moments at exactly 0 (masking weights after a plain step would
    let stale state regrow them).

    A MaskedSGD/MaskedAdam/MaskedAdamW is returned as it is. A torch.optim SGD, Adam or AdamW
    becomes the masked class with the same param groups, hyper-parameters and state; the
    original then refuses to step, so a loop that still calls it fails loudly. Any other
    optimizer is rejected.
    """
    if isinstance(optimizer, _MASKED):
        return optimizer
    masked_class = _MASKED_FOR.get(type(optimizer))
    if masked_class is None:
        raise TypeError(
            f"DSD cannot mask {type(optimizer).__module__}.{type(optimizer).__name__}: pass a "
            "torch.optim SGD, Adam or AdamW (converted for you) or a dsd_kernels.optim "
            "MaskedSGD/MaskedAdam/MaskedAdamW. Other optimizers keep state at pruned weights "
            "and would regrow them during the sparse phase.")
    for i, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "capturable", "differentiable"):
            if group.get(flag):
                raise ValueError(f"param group {i} uses {flag}=True, which the masked "
                                 f"optimizers do not support")
    accepted = inspect.signature(masked_class.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    masked = masked_class([{"params": group["params"]} for group in optimizer.param_groups],
                          **defaults)
    masked.load_state_dict(optimizer.state_dict())  # hyper-parameters of each group, and state

    def refuse_step(_optimizer, _args, _kwargs):
        raise RuntimeError("this optimizer was converted by dsd.DSD into a masked optimizer; "
                           "call step() on dsd.optimizer instead")

    optimizer.register_step_pre_hook(refuse_step)
    return masked


def zero_fractions(named_params) -> dict[str, float]:
    """Fraction of exactly-zero entries of each named tensor."""
    return {name: (p.detach() == 0).sum().item() / p.numel() for name, p in named_params}


class DSD:
    """Carries out a `Plan` on a model and optimizer inside any training loop.

    Call `epoch_start(epoch)` (plans in epochs) or `step_start(step)` (plans in steps) before
    the work of that epoch or step; it switches phases when a boundary is reached:
    - entering a sparse phase prunes the smallest-magnitude weights of each prunable tensor
      (or globally, `scope="global"`) with `dsd_kernels.magnitude_masks`, and fixes the mask;
    - entering a dense phase lifts the mask: pruned weights restart from 0 with 0 state;
    - each phase sets the learning rates to (rates when DSD started) x `phase.lr_scale`, by
      multiplying every param group's `lr` by new/old scale (so chainable schedulers such as
      StepLR still compose; with schedulers that set absolute rates, use lr scales of 1).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a dsd.Plan, got {type(plan).__name__}")
        self.model = model
        self.plan = plan
        self.named_prunable = prunable_parameters(model, plan.include, plan.exclude)
        self.optimizer = masked_optimizer(optimizer)
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.named_prunable if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"prunable parameters not in the optimizer: {', '.join(missing)}")
        self.phase_index: int | None = None  # None until the first epoch_start/step_start

    @property
    def phase(self):
        """The current Phase (None before the first epoch_start / step_start)."""
        return None if self.phase_index is None else self.plan.phases[self.phase_index]

    def epoch_start(self, epoch: int) -> bool:
        """Enter the phase of the 0-based `epoch`; True if this switched phase."""
        return self._advance("epochs", epoch)

    def step_start(self, step: int) -> bool:
        """Enter the phase of the 0-based optimizer `step`; True if this switched phase."""
        return self._advance("steps", step)

    def _advance(self, unit: str, position: int) -> bool:
        if self.plan.unit != unit:
            call = "epoch_start" if self.plan.unit == "epochs" else "step_start"
            raise ValueError(f"this plan counts {self.plan.unit}: call dsd.{call}()")
        target = self.plan.phase_at(position)
        if self.phase_index is not None and target < self.phase_index:
            raise ValueError(f"{unit[:-1]} {position} belongs to phase {target}, but DSD is "
                             f"already in phase {self.phase_index}; phases only go forward")
        switched = False
        while self.phase_index is None or self.phase_index < target:
            self._enter(0 if self.phase_index is None else self.phase_index + 1)
            switched = True
        return switched

    def _enter(self, index: int) -> None:
        phase = self.plan.phases[index]
        old = None if self.phase_index is None else self.plan.phases[self.phase_index]
        old_scale = 1.0 if old is None else old.lr_scale
        if phase.lr_scale != old_scale:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * (phase.lr_scale / old_scale)
        if phase.kind == "sparse":
            names = [name for name, _ in self.named_prunable]
            params = [p for _, p in self.named_prunable]
            masks = dsd_kernels.magnitude_masks([p.detach() for p in params], phase.sparsity,
                                                self.plan.scope, names=names)
            self.optimizer.set_masks(dict(zip(params, masks)))  # prunes weights and state now
        else:
            self.optimizer.clear_masks()
        self.phase_index = index

    def sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights in each prunable tensor, by parameter name."""
        return zero_fractions(self.named_prunable)

    def state_dict(self) -> dict:
        """The phase and the plan; the masks live in the optimizer's state_dict."""
        return {"phase_index": self.phase_index, "plan": self.plan.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the phase. Load the optimizer's state_dict too: it carries the masks."""
        if Plan.from_dict(state["plan"]) != self.plan:
            raise ValueError("this DSD state was saved with a different plan")
        index = state["phase_index"]
        if index is not None and not 0 <= index < len(self.plan.phases):
            raise ValueError(f"saved phase index {index} is outside the plan")
        self.phase_index = index
