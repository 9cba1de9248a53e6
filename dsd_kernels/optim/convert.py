"""make_masked_: a torch.optim optimizer made masked in place, so whatever already holds the
optimizer drives the masked step: SGD, Adam and AdamW become the fused masked classes, the
element-wise others get the general masked step (general.py)."""

import types

import torch

from . import general
from .masked import (
    MaskedAdam,
    MaskedAdamW,
    MaskedSGD,
    _Masked,
    refuse_unsupported_dtypes,
    unfused_flag,
)

_MASKED_VERSION = {torch.optim.SGD: MaskedSGD, torch.optim.Adam: MaskedAdam,
                   torch.optim.AdamW: MaskedAdamW}


def make_masked_(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Turn a torch.optim optimizer into its masked class in place; returns it.

    The object stays the same, with the same param groups and state, so whatever holds it (an
    LR scheduler, a GradScaler, Lightning's or Accelerate's wrapper, the user's own variable)
    now drives the masked step; a step wrapper an LR scheduler put on the object is pointed at
    the masked step. A masked optimizer is returned as it is.

    Args:
        optimizer: a torch.optim SGD, Adam, AdamW, Adadelta, Adagrad, Adamax, ASGD, NAdam,
            RAdam, RMSprop or Rprop (exactly those classes), or a masked one.

    Returns:
        The same object, now a MaskedSGD, MaskedAdam or MaskedAdamW, or for the others (and
        for SGD, Adam and AdamW using amsgrad, capturable or differentiable in their defaults
        or any group) a masked subclass of its class with the general masked step.

    Raises:
        TypeError: any other optimizer class (a subclass included).
        ValueError: a parameter of another dtype than float32, float16 and bfloat16 (named
            by group and position). The optimizer is left as it was: same class, param groups
            and state.
    """
    if isinstance(optimizer, _Masked):
        return optimizer
    kind = type(optimizer)
    masked_class = _MASKED_VERSION.get(kind)
    if masked_class is not None and any(map(unfused_flag, [optimizer.defaults,
                                                            *optimizer.param_groups])):
        masked_class = None  # amsgrad, capturable, differentiable: the general step has them
    if masked_class is None and kind in general.FRESH_STATE:
        masked_class = general.masked_class(kind)
    if masked_class is None:
        raise TypeError(
            f"cannot mask {kind.__module__}.{kind.__qualname__}: only torch.optim's SGD, Adam, "
            f"AdamW and {', '.join(c.__name__ for c in general.FRESH_STATE)} (converted in "
            "place, not subclasses) and dsd_kernels' masked classes have a masked step that "
            "keeps pruned weights and their optimizer state fresh; other optimizers would "
            "regrow them")
    for i, group in enumerate(optimizer.param_groups):
        refuse_unsupported_dtypes(group["params"], i, group.get("param_names"))
    old_step = type(optimizer).step  # hooked by torch.optim; __wrapped__ is torch's own step
    old_steps = [old_step, getattr(old_step, "__wrapped__", old_step)]
    redirect = _step_references(optimizer, old_steps)
    optimizer.__class__ = masked_class
    optimizer._masks = {}
    optimizer._patch_step_function()  # torch's step hooks and profiling, as at construction
    redirect(masked_class.step)
    return optimizer


def _step_references(optimizer, old_steps):
    """Find where a step wrapper on the instance (an LR scheduler's) holds the old class's
    step; returns a function that points those references at a new step function."""
    wrapper = optimizer.__dict__.get("step")
    if wrapper is None:
        return lambda new_step: None

    def refers_to_old(value):
        if isinstance(value, types.MethodType) and value.__self__ is optimizer:
            value = value.__func__
        return any(value is old for old in old_steps)

    if refers_to_old(wrapper):  # a bound method stored on the instance
        return lambda new_step: setattr(optimizer, "step", types.MethodType(new_step, optimizer))
    cells = [cell for cell in getattr(wrapper, "__closure__", None) or ()
             if refers_to_old(_contents(cell))]
    rewrap = refers_to_old(getattr(wrapper, "__wrapped__", None))

    def redirect(new_step):
        for cell in cells:
            bound = isinstance(cell.cell_contents, types.MethodType)
            cell.cell_contents = types.MethodType(new_step, optimizer) if bound else new_step
        if rewrap:
            wrapper.__wrapped__ = new_step
    return redirect


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not yet assigned
        return None

