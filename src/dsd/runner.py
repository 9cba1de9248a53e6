"""DSD in any training loop: pick the prunable parameters, make the optimizer masked (in
place), and switch phases (prune at the start of a sparse phase, lift the mask at re-dense,
scale the LR).

    dsd = DSD(model, optimizer, Plan.dsd(10, 10, 10, sparsity=0.5))  # optimizer now masked
    for epoch in range(dsd.plan.total):
        dsd.epoch_start(epoch)
        ...  # the usual batches: loss.backward(); optimizer.step()
"""

import fnmatch
import numbers

import torch
from torch import nn

import dsd_kernels
from dsd_kernels.optim import LR_SCALE, make_masked_

from .plan import Phase, Plan, as_patterns

# Modules whose `weight`-named parameters are pruned by default (the paper prunes these; biases
# and normalisation parameters are few and sensitive).
_PRUNABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.Embedding)


def prunable_parameters(model: nn.Module, include=(),
                        exclude=()) -> list[tuple[str, nn.Parameter]]:
    """The parameters a plan prunes, as (name, parameter) pairs in `model.named_parameters()`
    order.

    By default the trained (`requires_grad`) weights of Linear, Conv*, RNN/LSTM/GRU and
    Embedding layers: a frozen parameter gets no gradient, so once pruned it would never regrow.

    Args:
        model: the module whose parameters are selected.
        include: fnmatch patterns on full parameter names (one string is one pattern); they
            replace the default selection.
        exclude: patterns of names never pruned; applied after `include`.

    Raises:
        ValueError: a pattern that is not a non-empty string or matches no parameter (most
            likely a typo); `include` selecting a frozen parameter that `exclude` does not
            remove; nothing left to prune.
    """
    include, exclude = as_patterns("include", include), as_patterns("exclude", exclude)
    named = list(model.named_parameters())
    for pattern in include + exclude:
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
                chosen.update(prefix + name for name, p in module.named_parameters(recurse=False)
                              if name.startswith("weight") and p.requires_grad)
    chosen = {name for name in chosen
              if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)}
    selected = [(name, p) for name, p in named if name in chosen]
    frozen = [name for name, p in selected if not p.requires_grad]
    if frozen:
        raise ValueError(f"include selects frozen parameters (requires_grad=False), which would "
                         f"stay pruned: {', '.join(frozen)}; exclude them or unfreeze them")
    if not selected:
        raise ValueError("no prunable parameter selected: the model has no trained Linear, "
                         "Conv, RNN or Embedding weight, or include/exclude left none")
    return selected


def pattern_refusal(p: torch.Tensor, pattern: str) -> str | None:
    """Why `p` cannot take the N:M `pattern` (None if it can: `dsd_kernels.nm_eligible`):
    groups run along dim 1, which a 1-D tensor lacks and whose size must be a multiple of M."""
    if dsd_kernels.nm_eligible(p.detach(), pattern):
        return None
    m = pattern.split(":")[1]
    if p.dim() < 2:
        return f"{p.dim()}-D, N:M groups run along dim 1"
    return f"dim 1 ({p.shape[1]}) is not a multiple of {m}"


def pattern_targets(named_params, pattern: str, include=()) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of `named_params` that get N:M masks under `pattern`; the
    others stay dense.

    Raises:
        ValueError: If an `include` pattern that names one parameter exactly (no wildcard)
            names one that cannot take the pattern, or none of `named_params` can.
    """
    named_params = list(named_params)
    for name, p in named_params:
        reason = pattern_refusal(p, pattern)
        if reason and name in as_patterns("include", include):
            raise ValueError(f"include names {name} (shape {tuple(p.shape)}), which cannot take "
                             f"pattern {pattern}: {reason}")
    targets = [(name, p) for name, p in named_params if pattern_refusal(p, pattern) is None]
    if not targets:
        shapes = ", ".join(f"{name} {tuple(p.shape)}" for name, p in named_params)
        raise ValueError(f"no selected parameter can take pattern {pattern} (it needs 2+ dims "
                         f"and dim 1 a multiple of M): {shapes}")
    return targets


def zero_fractions(named_params) -> dict[str, float]:
    """Fraction of exactly-zero entries of each named tensor (of the whole tensor, for an FSDP2
    DTensor: every rank calls it)."""
    fractions = {}
    for name, p in named_params:
        zeros = (p.detach() == 0).sum()
        if hasattr(zeros, "full_tensor"):  # a DTensor's count is partial: sum over the ranks
            zeros = zeros.full_tensor()
        fractions[name] = zeros.item() / p.numel()
    return fractions


class DSD:
    """Carries out a `Plan` on a model and optimizer inside any training loop.

    Call `epoch_start(epoch)` (plans in epochs) or `step_start(step)` (plans in steps) before
    the work of that epoch or step; it switches phases when a boundary is reached:

    - entering a sparse phase prunes the smallest-magnitude weights of each prunable tensor
      (or globally, ``scope="global"``) with `dsd_kernels.magnitude_masks`, and fixes the mask;
      a phase with an N:M pattern masks the prunable tensors that can take it
      (`pattern_targets`) with `dsd_kernels.nm_masks` and leaves the others dense;
    - entering a dense phase lifts the mask: pruned weights restart from 0 with 0 state;
    - each phase's `lr_scale` goes into every param group as `dsd_kernels.optim.LR_SCALE`,
      which the masked step multiplies ``lr`` by: ``lr`` itself stays whatever the user or an
      LR scheduler sets (chainable or absolute), and the scale composes with it.

    The optimizer is made masked in place (`dsd_kernels.optim.make_masked_`): keep stepping
    it, and anything that holds it (an LR scheduler, a GradScaler, a framework's wrapper)
    keeps working. ``dsd.optimizer`` is the same object. Everything is checked before the
    optimizer changes: a refused one is left as it was.

    Args:
        model: the module trained; give the unwrapped module under DDP. Its prunable
            parameters (`dsd.prunable_parameters` with the plan's include/exclude) are chosen
            here, once.
        optimizer: a torch.optim optimizer `make_masked_` takes (or a masked one) holding
            every prunable parameter.
        plan: the `Plan` to carry out.

    Raises:
        TypeError: If `plan` is not a `Plan`, or `optimizer` is not one `make_masked_` takes
            (any torch.optim.Optimizer but SparseAdam) or a masked one.
        ValueError: If the plan's patterns match no parameter or select a frozen one, nothing
            is left to prune, an N:M pattern fits no prunable tensor or one that include
            names exactly (`pattern_targets`), a prunable parameter is not in the optimizer
            or has a dtype the masked step does not support, or a phase scales the learning
            rate of a param group whose lr is not a number (e.g. Adafactor's relative_step).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a dsd.Plan, got {type(plan).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim optimizer, got "
                            f"{type(optimizer).__name__}")
        named_prunable = prunable_parameters(model, plan.include, plan.exclude)
        # The tensors each N:M pattern masks, chosen (and refused) once, before any change.
        nm_targets = {pattern: pattern_targets(named_prunable, pattern, plan.include)
                      for pattern in plan.patterns}
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in named_prunable if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"prunable parameters not in the optimizer: {', '.join(missing)}")
        scales = sorted({phase.lr_scale for phase in plan.phases} - {1.0})
        for index, group in enumerate(optimizer.param_groups):
            if scales and not isinstance(group.get("lr"), (numbers.Real, torch.Tensor)):
                raise ValueError(f"param group {index} has lr={group.get('lr')!r}, which the "
                                 f"plan's lr scale {scales[0]} cannot scale: the optimizer sets "
                                 "its own step size (e.g. Adafactor's relative_step); use "
                                 "redense_lr_factor=1")
        self.model = model
        self.plan = plan
        self.named_prunable = named_prunable
        self._nm_targets = nm_targets
        self.optimizer = make_masked_(optimizer)
        self.phase_index: int | None = None  # None until the first epoch_start/step_start

    @property
    def phase(self):
        """The current Phase (None before the first epoch_start / step_start)."""
        return None if self.phase_index is None else self.plan.phases[self.phase_index]

    def epoch_start(self, epoch: int) -> bool:
        """Enter the phase of the 0-based `epoch`, and the phases before it not yet entered.

        Args:
            epoch: the epoch about to start, counted from 0.

        Returns:
            True if this switched phase (pruned, or lifted the masks).

        Raises:
            ValueError: If the plan counts steps, `epoch` is outside the plan, or it belongs
                to a phase before the current one.
        """
        return self._advance("epochs", epoch)

    def step_start(self, step: int) -> bool:
        """Enter the phase of the 0-based optimizer `step`, and the phases before it not yet
        entered.

        Args:
            step: the optimizer step about to run, counted from 0.

        Returns:
            True if this switched phase (pruned, or lifted the masks).

        Raises:
            ValueError: If the plan counts epochs, `step` is outside the plan, or it belongs
                to a phase before the current one.
        """
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
        for group in self.optimizer.param_groups:
            group[LR_SCALE] = phase.lr_scale
        if phase.kind == "sparse":
            self.optimizer.set_masks(self._masks(phase))
        else:
            self.optimizer.clear_masks()
        self.phase_index = index

    def masked_parameters(self, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs that sparse `phase` masks: every prunable one, or
        under an N:M pattern those that can take it."""
        return self._nm_targets[phase.pattern] if phase.pattern else self.named_prunable

    def _masks(self, phase: Phase) -> dict:
        """{parameter: mask} of sparse `phase` on the current weights."""
        named = self.masked_parameters(phase)
        weights, names = [p.detach() for _, p in named], [name for name, _ in named]
        if phase.pattern:  # groups run along dim 1, inside the dim-0 shard of a DTensor
            masks = dsd_kernels.nm_masks([dsd_kernels.local_tensor(w) for w in weights],
                                         phase.pattern, names=names)
        else:
            masks = dsd_kernels.magnitude_masks(weights, phase.sparsity, self.plan.scope,
                                                names=names)
        return dict(zip((p for _, p in named), masks))

    def resume(self, done: int) -> None:
        """Take up a run whose model and optimizer were restored from a checkpoint taken after
        `done` epochs or steps (the plan's unit; for a checkpoint in the middle of an epoch,
        count that epoch as done). The phase of the last one done becomes current without
        being entered anew (nothing is pruned again), so the next epoch_start / step_start
        switches only at a boundary.

        The masks travel in a masked optimizer's state_dict. If they were lost (the
        checkpoint was loaded into a plain torch.optim optimizer, which drops them), they are
        recovered from the weights: the phase's magnitude masks on the restored weights must
        prune exactly the weights that are zero (under an N:M pattern: only weights that are
        zero; a group with fewer than N non-zeros keeps zeros by the position rule).

        Args:
            done: epochs or steps the checkpoint had finished; 0 starts from the beginning.

        Raises:
            ValueError: If `done` is not an int in [0, plan.total], or the masks of a sparse
                phase are neither in the optimizer nor recoverable from the weights; nothing
                is changed then.
        """
        if isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise ValueError(f"done must be an int >= 0, got {done!r}")
        if done == 0:
            self.phase_index = None
            return
        index = self.plan.phase_at(done - 1)
        phase = self.plan.phases[index]
        masks = self.optimizer.masks
        if phase.kind == "sparse" and \
                not all(p in masks for _, p in self.masked_parameters(phase)):
            masks = self._masks(phase)
            for name, p in self.masked_parameters(phase):
                nonzero = dsd_kernels.local_tensor(p.detach()) != 0
                # An N:M mask keeps N in every group, zeros too where a group has fewer
                # non-zeros (an embedding's padding row): it need only keep every non-zero.
                if not (torch.equal(masks[p] | nonzero, masks[p]) if phase.pattern
                        else torch.equal(masks[p], nonzero)):
                    pruned = f"pattern {phase.pattern}" if phase.pattern else \
                        f"the {phase.sparsity:g} smallest-magnitude weights"
                    raise ValueError(
                        f"cannot recover the masks of sparse phase {index}: the zeros of {name} "
                        f"are not those of {pruned}; restore the checkpoint into a dsd_kernels "
                        "masked optimizer, whose state_dict carries the masks")
            self.optimizer.set_masks(masks)
        elif phase.kind == "dense":
            self.optimizer.clear_masks()
        for group in self.optimizer.param_groups:
            group[LR_SCALE] = phase.lr_scale
        self.phase_index = index

    def sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights in each prunable tensor, by parameter name."""
        return zero_fractions(self.named_prunable)

    def state_dict(self) -> dict:
        """The phase and the plan; the masks live in the optimizer's state_dict."""
        return {"phase_index": self.phase_index, "plan": self.plan.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the phase of `state_dict()`. Load the optimizer's state_dict too: it
        carries the masks.

        Raises:
            ValueError: If `state` was saved with another plan, or its phase is outside it.
        """
        if Plan.from_dict(state["plan"]) != self.plan:
            raise ValueError("this DSD state was saved with a different plan")
        index = state["phase_index"]
        if index is not None and not 0 <= index < len(self.plan.phases):
            raise ValueError(f"saved phase index {index} is outside the plan")
        self.phase_index = index
