"""Drop-in masked versions of torch.optim.SGD, Adam and AdamW.

Each subclasses its torch.optim class, so the constructor, defaults, param groups, state
layout and state_dict format are torch's own, and LR schedulers, GradScaler and checkpoints
work unchanged. `step` runs one fused masked update per device and param group: a pruned
weight and its optimizer state are exactly 0 after every step, whatever the gradient.

    opt = MaskedAdamW(model.parameters(), lr=1e-3)
    opt.set_masks({model.fc.weight: mask})   # prunes now; the mask holds until cleared
    opt.clear_masks()                        # pruned weights regrow from 0, with 0 state

An optimizer that already exists (held by a scheduler, a GradScaler, Lightning, Accelerate)
is converted in place by `make_masked_(opt)`: the same object becomes masked.

A param group may carry `LR_SCALE` ("dsd_lr_scale", default 1): the step uses
`lr * group[LR_SCALE]`. DSD's re-dense LR factor lives there, so it composes with any LR
scheduler, which owns `lr` and may set it to absolute values every step.
"""

import types
from collections import defaultdict
from collections.abc import Mapping

import torch

from . import _checks, apply_masks_
from .backends import ensure_selected
from .distributed import local_tensor

_ops = torch.ops.dsd

LR_SCALE = "dsd_lr_scale"  # param-group key: the step's learning rate is lr * group[LR_SCALE]


def step_lr(group: dict) -> float:
    """The learning rate a masked step uses for a param group: lr x its LR_SCALE."""
    return float(group["lr"]) * float(group.get(LR_SCALE, 1.0))


class _Masked:
    """Mask bookkeeping shared by the masked optimizers (mixed in before the torch class)."""

    # GradScaler hands over `grad_scale` and `found_inf`: the kernels unscale gradients as
    # they read them, instead of a separate unscale pass over every gradient.
    _step_supports_amp_scaling = True
    _state_names: tuple[str, ...] = ()  # state tensors zeroed with the weight when pruned

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (the constructor's groups pass here too), refusing the
        flags the masked step does not implement."""
        _refuse_unsupported({**self.defaults, **param_group},
                            f"param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    def _init_group(self, *args, **kwargs):
        # Only torch.optim's own step calls this: reached on a masked optimizer, it means
        # something still holds the step of the optimizer from before make_masked_, which
        # would update without masks. Refuse before anything is modified.
        raise RuntimeError(
            "torch.optim's unmasked step was called on a masked optimizer: something still "
            "holds the step method it had before make_masked_ converted it; create that "
            "wrapper after converting, or call optimizer.step() itself")

    @property
    def masks(self) -> dict:
        """The current masks, {param: bool mask (True = kept)}, as a new dict."""
        return dict(self._masks)

    def _params_in_order(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def set_masks(self, masks: Mapping) -> None:
        """Fix the masks {param: bool mask, True = kept}, replacing all earlier ones.

        Prunes at once: each masked parameter and its optimizer state are set to 0 where its
        mask is False. Parameters without a mask are updated densely.
        """
        if not isinstance(masks, Mapping):
            raise ValueError(f"set_masks takes a dict {{param: mask}}, not {type(masks).__name__}")
        index = {id(p): i for i, p in enumerate(self._params_in_order())}
        for p, mask in masks.items():
            if not isinstance(p, torch.Tensor) or id(p) not in index:
                raise ValueError("set_masks: a key is not a parameter of this optimizer")
            what = f"parameter {index[id(p)]}"
            _checks.mask_for(mask, local_tensor(p), f"the mask of {what}", what)
            if p.dtype not in _checks.FLOAT_DTYPES:
                raise ValueError(f"{what} has dtype {p.dtype}; supported: float32, float16, "
                                 "bfloat16")
        # Kept in the parameter's memory layout (channels_last, ...), so no step converts it.
        self._masks = {p: _in_layout_of(mask, local_tensor(p)) for p, mask in masks.items()}
        targets, target_masks = [], []
        for p, mask in self._masks.items():
            state = self.state.get(p, {})
            for t in [p] + [state[name] for name in self._state_names if name in state]:
                targets.append(t)
                target_masks.append(mask)
        if targets:
            apply_masks_(targets, target_masks)

    def clear_masks(self) -> None:
        """Lift every mask: pruned weights (0, with 0 state) are free to regrow."""
        self._masks = {}

    def state_dict(self) -> dict:
        """torch's optimizer state_dict plus "masks": {param index: bool mask}."""
        state_dict = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._params_in_order())}
        state_dict["masks"] = {index[id(p)]: mask for p, mask in self._masks.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch's format; "masks", if present, are restored onto the parameters' devices.
        A state_dict of an optimizer using amsgrad, capturable or differentiable is refused."""
        for i, group in enumerate(state_dict.get("param_groups", ())):
            _refuse_unsupported(group, f"state_dict param group {i}")
        state_dict = dict(state_dict)
        saved = state_dict.pop("masks", {})
        params = self._params_in_order()
        masks = {}
        for i, mask in saved.items():
            if not (isinstance(i, int) and 0 <= i < len(params)):
                raise ValueError(f"state_dict['masks'] has a mask for parameter {i!r}, but this "
                                 f"optimizer has {len(params)} parameters")
            p = params[i]
            if isinstance(mask, torch.Tensor):
                mask = mask.to(p.device)
            _checks.mask_for(mask, local_tensor(p), f"state_dict['masks'][{i}]", f"parameter {i}")
            masks[p] = _in_layout_of(mask, local_tensor(p))
        super().load_state_dict(state_dict)
        self._masks = masks

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler's found_inf skips the whole step (weights, state and step counts). It is
        # read on the host, as GradScaler itself does for torch's non-fused optimizers: Adam's
        # bias correction takes the step counts as host numbers, so whether to count a step
        # must be known before the launch.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        ensure_selected()
        for index, group in enumerate(self.param_groups):  # all checks before any update
            self._check_group(index, group)
        for group in self.param_groups:
            self._update_group(group, grad_scale)
        return loss

    def _check_group(self, index: int, group: dict) -> None:
        """Everything a step could refuse in this group, checked before anything changes."""
        _refuse_unsupported(group, f"param group {index}")
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            what = f"param group {index}, parameter {i}" + (f" ({names[i]!r})" if names else "")
            if p.grad.is_sparse:
                raise ValueError(f"{what} has a sparse gradient; the masked optimizers need "
                                 "dense gradients")
            if p.dtype not in _checks.FLOAT_DTYPES:
                raise ValueError(f"{what} has dtype {p.dtype}; supported: float32, float16, "
                                 "bfloat16")
            mask = self._masks.get(p)
            if mask is not None and mask.device != p.device:
                raise ValueError(f"the mask of {what} is on {mask.device} but the parameter "
                                 f"moved to {p.device}; call set_masks again after moving it")

    def _grads_by_device(self, group, make_state):
        """Params of a group that have gradients, bucketed per (device, key from make_state).
        The kernels see plain tensors: an FSDP2 (DTensor) parameter updates its local shard."""
        buckets = defaultdict(lambda: defaultdict(list))
        for p in group["params"]:
            if p.grad is None:
                continue
            mask = self._masks.get(p)
            key, state = make_state(p)
            bucket = buckets[(p.device, key)]
            bucket["params"].append(local_tensor(p))
            bucket["grads"].append(local_tensor(p.grad))
            bucket["masks"].append(mask)
            for name, value in state.items():
                bucket[name].append(local_tensor(value))
        return buckets


def _in_layout_of(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The mask with the strides of its parameter (a copy only when they differ)."""
    if mask.stride() == p.stride():
        return mask
    return torch.empty_like(p, dtype=torch.bool).copy_(mask)


_UNSUPPORTED_FLAGS = ("amsgrad", "capturable", "differentiable")


def _refuse_unsupported(settings: Mapping, where: str) -> None:
    """A ValueError if `settings` (a param group, defaults) turn on a flag the masked step
    does not implement."""
    for flag in _UNSUPPORTED_FLAGS:
        if settings.get(flag):
            raise ValueError(f"{where} uses {flag}=True, which the masked optimizers do not "
                             "support")


def _scale_on(grad_scale, device):
    return None if grad_scale is None else grad_scale.to(device).reshape(())


class MaskedSGD(_Masked, torch.optim.SGD):
    """torch.optim.SGD whose step keeps masked-out weights and momentum exactly 0."""

    _state_names = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None):
        # foreach/fused are accepted for drop-in use: the masked step is always one fused pass.
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, differentiable=differentiable)
        self._masks = {}

    def _update_group(self, group, grad_scale):
        momentum = float(group["momentum"])

        def make_state(p):
            # A new buffer is a copy of the first gradient in torch.optim, which is what a
            # zero buffer gives on a step without dampening.
            if momentum == 0:
                return False, {}
            state = self.state[p]
            fresh = state.get("momentum_buffer") is None
            if fresh:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return fresh, {"momentum_buffers": state["momentum_buffer"]}

        for (device, fresh), b in self._grads_by_device(group, make_state).items():
            _ops.masked_sgd_(
                b["params"], b["grads"], b["momentum_buffers"], b["masks"],
                step_lr(group), momentum, 0.0 if fresh else float(group["dampening"]),
                float(group["weight_decay"]), bool(group["nesterov"]),
                bool(group["maximize"]), _scale_on(grad_scale, device))


class _MaskedAdamStep(_Masked):
    _state_names = ("exp_avg", "exp_avg_sq")

    def _update_group(self, group, grad_scale):
        def make_state(p):
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return None, {"exp_avgs": state["exp_avg"], "exp_avg_sqs": state["exp_avg_sq"],
                          "step_counts": state["step"]}

        beta1, beta2 = (float(beta) for beta in group["betas"])
        decoupled = group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))
        for (device, _), b in self._grads_by_device(group, make_state).items():
            # Counted once every parameter has passed the checks, in one call per bucket.
            torch._foreach_add_(b["step_counts"], 1)
            _ops.masked_adam_(
                b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], b["masks"],
                [float(step) for step in b["step_counts"]], step_lr(group), beta1, beta2,
                float(group["eps"]), float(group["weight_decay"]), bool(decoupled),
                bool(group["maximize"]), _scale_on(grad_scale, device))


class MaskedAdam(_MaskedAdamStep, torch.optim.Adam):
    """torch.optim.Adam whose step keeps masked-out weights and both moments exactly 0."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, differentiable=differentiable,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._masks = {}


class MaskedAdamW(_MaskedAdamStep, torch.optim.AdamW):
    """torch.optim.AdamW whose step keeps masked-out weights and both moments exactly 0."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, differentiable=differentiable)
        self._masks = {}


_MASKED_VERSION = {torch.optim.SGD: MaskedSGD, torch.optim.Adam: MaskedAdam,
                   torch.optim.AdamW: MaskedAdamW}
def make_masked_(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Turn a torch.optim SGD, Adam or AdamW into its masked class in place; returns it.

    The object stays the same, with the same param groups and state, so whatever holds it (an
    LR scheduler, a GradScaler, Lightning's or Accelerate's wrapper, the user's own variable)
    now drives the masked step; a step wrapper an LR scheduler put on the object is pointed at
    the masked step. A masked optimizer is returned as it is. Anything else, or a group using
    amsgrad, capturable or differentiable, is refused with nothing modified.
    """
    if isinstance(optimizer, _Masked):
        return optimizer
    masked_class = _MASKED_VERSION.get(type(optimizer))
    if masked_class is None:
        kind = type(optimizer)
        raise TypeError(
            f"cannot mask {kind.__module__}.{kind.__qualname__}: only torch.optim SGD, Adam and "
            "AdamW (converted in place) and dsd_kernels' MaskedSGD/MaskedAdam/MaskedAdamW keep "
            "the optimizer state of pruned weights at zero; other optimizers would regrow them")
    _refuse_unsupported(optimizer.defaults, "the optimizer's defaults")
    for i, group in enumerate(optimizer.param_groups):
        _refuse_unsupported(group, f"param group {i}")
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
