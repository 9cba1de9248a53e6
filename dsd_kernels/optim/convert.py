"""make_masked_: a torch.optim.Optimizer made masked in place, so whatever already holds the
optimizer drives the masked step: SGD, Adam and AdamW become the fused masked classes, every
other optimizer gets the general masked step (general.py)."""

import types

import torch

from . import general
from .masked import (
    SHARDED_MASK,
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
    """Turn a torch.optim.Optimizer into a masked one in place; returns it.

    The object stays the same, with the same param groups and state, so whatever holds it (an
    LR scheduler, a GradScaler, Lightning's or Accelerate's wrapper, the user's own variable)
    now drives the masked step; a step wrapper an LR scheduler put on the object is pointed at
    the masked step, and a step method taken before the conversion raises instead of updating.
    A masked optimizer is returned as it is.

    Args:
        optimizer: any torch.optim.Optimizer (torch.optim's classes but SparseAdam, their
            subclasses, other libraries' optimizers), or a masked one.

    Returns:
        The same object: exactly torch.optim's SGD, Adam and AdamW become MaskedSGD, MaskedAdam
        and MaskedAdamW (fused step) unless their defaults or a group use amsgrad, capturable
        or differentiable; every other optimizer becomes a masked subclass of its class with
        the general masked step (docs/design.md, The general masked step).

    Raises:
        TypeError: not a torch.optim.Optimizer, or a SparseAdam (sparse gradients).
        ValueError: a parameter of another dtype than float32, float16 and bfloat16 (named
            by group and position), or, for a class torch.optim does not define, no fresh
            state could be found for it (fresh.probe). The optimizer is left as it was: same
            class, param groups and state.
    """
    if isinstance(optimizer, _Masked):
        return optimizer
    kind = type(optimizer)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cannot mask {name}: not a torch.optim.Optimizer")
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(f"cannot mask {name}: it takes sparse gradients, which have no pruned "
                        "positions to mask; use Adam or AdamW")
    for i, group in enumerate(optimizer.param_groups):
        refuse_unsupported_dtypes(group["params"], i, group.get("param_names"))
    masked_class = _MASKED_VERSION.get(kind)
    use_general = masked_class is None or any(map(unfused_flag, [optimizer.defaults,
                                                                  *optimizer.param_groups]))
    if use_general:
        masked_class = general.masked_class(kind)
        for group in optimizer.param_groups:  # found (a probe may refuse) before any change
            kinds = {(p.dim(), p.dtype, p.device): p for p in group["params"]}
            general.fresh_state(kind, optimizer, list(kinds.values()))
    old_step = type(optimizer).step  # hooked by torch.optim; __wrapped__ is torch's own step
    old_steps = [old_step, getattr(old_step, "__wrapped__", old_step)]
    redirect = _step_references(optimizer, old_steps)
    optimizer.__class__ = masked_class
    optimizer._masks = {}
    for state in optimizer.state.values():  # a masked optimizer's saved masks, which a plain
        state.pop(SHARDED_MASK, None)       # one took as state when loading its state_dict
    optimizer._patch_step_function()  # torch's step hooks and profiling, as at construction
    redirect(masked_class.step)
    if use_general:  # the old class's hooked step runs the instance's hooks: refuse there
        handle = optimizer.register_step_pre_hook(general.refuse_stale_step)
        optimizer._optimizer_step_pre_hooks.move_to_end(handle.id, last=False)
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

