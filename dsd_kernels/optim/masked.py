"""The masked optimizers: torch.optim's SGD, Adam and AdamW whose step keeps pruned weights
and their optimizer state exactly 0 (docs/design.md, The masked optimizers).

A param group may carry `LR_SCALE` ("dsd_lr_scale", default 1): the step uses
`lr * group[LR_SCALE]`. DSD's re-dense LR factor lives there, so it composes with any LR
scheduler, which owns `lr` and may set it to absolute values every step.
"""

from collections.abc import Mapping
from itertools import compress
from operator import attrgetter

import torch

from .. import _checks
from ..backends import ensure_selected
from ..distributed import is_dtensor, like_dtensor, local_tensor
from ..functional import apply_masks_
from .plan import PLAIN, Bucket, Plan

_ops = torch.ops.dsd

SHARDED_MASK = "dsd_mask"  # per-parameter state key of a DTensor parameter's mask
LR_SCALE = "dsd_lr_scale"  # param-group key: the step's learning rate is lr * group[LR_SCALE]

_GRAD, _DTYPE, _DEVICE = map(attrgetter, ("grad", "dtype", "device"))
_CPU = torch.device("cpu")


def step_lr(group: dict) -> float:
    """The learning rate a masked step uses for a param group: lr x its LR_SCALE."""
    return float(group["lr"]) * float(group.get(LR_SCALE, 1.0))


def _parameter(index: int, i: int, names) -> str:
    """How errors call parameter i of param group `index`."""
    return f"param group {index}, parameter {i}" + (f" ({names[i]!r})" if names else "")


def _dtype_error(what: str, dtype: torch.dtype) -> ValueError:
    return ValueError(f"{what} has dtype {dtype}; the masked optimizers support float32, "
                      "float16 and bfloat16")


def refuse_unsupported_dtypes(params: list, index: int, names=None) -> None:
    """A ValueError naming the first of `params` (param group `index`'s tensors, or torch's
    (name, tensor) pairs) whose dtype the masked step cannot update."""
    for i, p in enumerate(params):
        if isinstance(p, tuple) and len(p) == 2:
            (name, p), names = p, None
            what = f"{_parameter(index, i, None)} ({name!r})"
        else:
            what = _parameter(index, i, names)
        if isinstance(p, torch.Tensor) and p.dtype not in _checks.FLOAT_DTYPES:
            raise _dtype_error(what, p.dtype)


class _Masked:
    """Mask bookkeeping and the step shared by the masked optimizers (mixed in before the
    torch class). A subclass names the state entries its step reads (`_read_state`, in the
    order buckets keep them), creates a parameter's state (`_state_for`) and launches its
    fused kernel on a bucket (`_launch`)."""

    # GradScaler hands over `grad_scale` and `found_inf`: the kernels unscale gradients as
    # they read them, instead of a separate unscale pass over every gradient.
    _step_supports_amp_scaling = True
    _state_names: tuple[str, ...] = ()  # state tensors zeroed with the weight when pruned
    _plans: list | tuple = ()  # per param group, its last step's Plan (None: not reusable)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (the constructor's groups pass here too), refusing the
        flags the masked step does not implement and parameters of other dtypes than
        float32, float16 and bfloat16, with the optimizer unchanged.

        Raises:
            ValueError: a flag (amsgrad, capturable, differentiable) is on, or a parameter has
                an unsupported dtype (the message names its group, position and dtype).
        """
        index = len(self.param_groups)
        self._refuse_flags({**self.defaults, **param_group}, f"param group {index}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):  # torch refuses those
            params = param_group["params"] = list(params)  # torch's own first step: read once
        if isinstance(params, list):
            refuse_unsupported_dtypes(params, index, param_group.get("param_names"))
        super().add_param_group(param_group)

    def _init_group(self, *args, **kwargs):
        # Only torch.optim's own step calls this: reached on a masked optimizer, it means
        # something still holds the step of the optimizer from before make_masked_, which
        # would update without masks. Refuse before anything is modified.
        raise RuntimeError(
            "torch.optim's unmasked step was called on a masked optimizer: something still "
            "holds the step method it had before make_masked_ converted it; create that "
            "wrapper after converting, or call optimizer.step() itself")

    def _refuse_flags(self, settings: Mapping, where: str) -> None:
        """A ValueError if `settings` (a param group, defaults) turn on a flag the fused step
        does not implement, pointing at the general masked step, which does."""
        flag = unfused_flag(settings)
        if flag is not None:
            name = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.optim"))
            raise ValueError(
                f"{where} uses {flag}=True, which the masked optimizers do not implement in "
                f"their fused step ({type(self).__name__}): build torch.optim.{name.__name__}"
                f"(..., {flag}=True) and call dsd_kernels.optim.make_masked_ on it for the "
                "general masked step")

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
        masks = {p: _in_layout_of(mask, local_tensor(p)) for p, mask in masks.items()}
        self._prune(masks)  # first: the general step may still refuse here, changing nothing
        self._masks = masks
        self._plans = ()  # they would not match the new dict, but would hold the old masks

    def _prune(self, masks: dict) -> None:
        """Set each masked parameter and its `_state_names` state to 0 at pruned positions."""
        targets, target_masks = [], []
        for p, mask in masks.items():
            state = self.state.get(p, {})
            for t in [p] + [state[name] for name in self._state_names if name in state]:
                targets.append(t)
                target_masks.append(mask)
        if targets:
            apply_masks_(targets, target_masks)

    def clear_masks(self) -> None:
        """Lift every mask: pruned weights (0, with 0 state) are free to regrow."""
        self._masks = {}
        self._plans = ()

    def __getstate__(self) -> dict:
        """torch's pickled state (defaults, state, param groups) plus the masks, which a
        pickle or copy.deepcopy keeps."""
        return {**super().__getstate__(), "_masks": self._masks}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        masks = state.pop("_masks", {})
        super().__setstate__(state)
        self._masks = masks

    def state_dict(self) -> dict:
        """torch's optimizer state_dict plus the masks: "masks", {param index: bool mask}, for
        plain parameters; a DTensor parameter's (FSDP2's) mask is a DTensor laid out like it,
        in its own state under SHARDED_MASK (all True while unmasked), because
        torch.distributed.checkpoint keeps only per-parameter state and reshards it there."""
        state_dict = super().state_dict()
        state, masks = state_dict["state"], {}
        for i, p in enumerate(self._params_in_order()):
            mask = self._masks.get(p)
            if is_dtensor(p):
                if mask is None:
                    mask = torch.ones_like(local_tensor(p), dtype=torch.bool)
                state[i] = {**state.get(i, {}), SHARDED_MASK: like_dtensor(mask, p)}
            elif mask is not None:
                masks[i] = mask
        state_dict["masks"] = masks
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch's format; the masks of `state_dict()`, if present, are restored onto the
        parameters' devices (an all-True mask of a DTensor parameter: unmasked; a state entry
        that held only a mask leaves the parameter without state, as before its first step).
        A fused optimizer refuses a state_dict of one using amsgrad, capturable or
        differentiable."""
        for i, group in enumerate(state_dict.get("param_groups", ())):
            self._refuse_flags(group, f"state_dict param group {i}")
        state_dict = dict(state_dict)
        saved = dict(state_dict.pop("masks", {}))
        params = self._params_in_order()
        if "state" in state_dict:  # entries copied: the caller's dict stays as it was
            state_dict["state"] = {key: dict(entry) for key, entry in state_dict["state"].items()}
            # Keyed as the saved groups list their parameters (indices, or DCP's names).
            position = {key: i for i, key in enumerate(
                key for group in state_dict.get("param_groups", ()) for key in group["params"])}
            for key, entry in list(state_dict["state"].items()):
                mask = entry.pop(SHARDED_MASK, None)
                if mask is not None and not _all_true(mask):
                    saved[position.get(key, key)] = local_tensor(mask)
                if mask is not None and not entry:  # held only the mask: no state (no step)
                    del state_dict["state"][key]
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
        self._plans = ()  # they would not match the new state, but would hold the old one

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
        checked = []
        for index, group in enumerate(self.param_groups):  # all checks before any update
            self._refuse_flags(group, f"param group {index}")
            grads = list(map(_GRAD, group["params"]))
            plan = self._plans[index] if index < len(self._plans) else None
            if plan is None or not plan.matches(self, group, grads):
                self._check_group(index, group)
                plan = None
            checked.append((group, grads, plan))
        plans = []
        for group, grads, plan in checked:
            if plan is None:
                plan = self._plan(group, grads)
            plans.append(plan if plan.reusable else None)
            for bucket, bucket_grads in plan.launches(grads):
                self._launch(group, bucket, bucket_grads, grad_scale)
        self._plans = plans
        return loss

    def _check_group(self, index: int, group: dict) -> None:
        """Everything a step could refuse in this group's tensors, checked before anything
        changes (a plan that matches stands for these checks having passed)."""
        names = group.get("param_names")

        def what(i):
            return _parameter(index, i, names)

        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{what(i)} has a sparse gradient; the masked optimizers need "
                                 "dense gradients")
            if p.dtype not in _checks.FLOAT_DTYPES:
                raise _dtype_error(what(i), p.dtype)
            mask = self._masks.get(p)
            if mask is not None and mask.device != p.device:
                raise ValueError(f"the mask of {what(i)} is on {mask.device} but the parameter "
                                 f"moved to {p.device}; call set_masks again after moving it")

    def _plan(self, group: dict, grads: list) -> "Plan":
        """The plan of a checked group's step: its params with gradients bucketed per (device,
        kind of step), with the state a first step needs created."""
        has_grad = tuple(g is not None for g in grads)
        present = list(compress(group["params"], has_grad))
        names = self._read_state(group)
        buckets, created = {}, False
        for i, p in enumerate(present):
            key, state, new = self._state_for(group, p)
            created |= new
            bucket = buckets.get((p.device, key))
            if bucket is None:
                bucket = buckets[(p.device, key)] = Bucket(p.device, key, len(names))
            bucket.positions.append(i)
            bucket.params.append(p)
            bucket.masks.append(self._masks.get(p))
            bucket.state_dicts.append(state)
            for column, name in zip(bucket.states, names):
                column.append(state[name])
        plain = set(map(type, compress(grads, has_grad))) <= PLAIN
        for bucket in buckets.values():
            plain &= bucket.to_local()
        # A plan made while creating state would not be made again (SGD's first step is a
        # kind of its own); one of FSDP2 parameters would hold local shards that FSDP may
        # replace between steps.
        reusable = plain and not created
        if reusable:
            for bucket in buckets.values():
                self._share_state(bucket)
        return Plan(self, group, grads, has_grad, present, list(buckets.values()), reusable)

    def _share_state(self, bucket: "Bucket") -> None:
        """Lay out the state of a reusable plan's bucket for cheap steps (Adam's step counts)."""


def _all_true(mask: torch.Tensor) -> bool:
    """Whether the whole mask keeps everything: for a DTensor, on every rank's shard (one
    all_reduce), so that all ranks take the same parameters as masked."""
    kept = mask.all()
    return bool(kept.full_tensor() if is_dtensor(kept) else kept)


def _in_layout_of(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The mask with the strides of its parameter (a copy only when they differ)."""
    if mask.stride() == p.stride():
        return mask
    return torch.empty_like(p, dtype=torch.bool).copy_(mask)


FUSED_FLAGS = ("amsgrad", "capturable", "differentiable")  # only the general step has them


def unfused_flag(settings: Mapping) -> str | None:
    """The first flag of FUSED_FLAGS that `settings` (a param group, defaults) turn on."""
    return next((flag for flag in FUSED_FLAGS if settings.get(flag)), None)


def _scale_on(grad_scale, device):
    return None if grad_scale is None else grad_scale.to(device).reshape(())


class MaskedSGD(_Masked, torch.optim.SGD):
    """torch.optim.SGD whose step keeps masked-out weights and momentum exactly 0.

    Constructor, defaults, param groups, state and state_dict are torch.optim.SGD's (plus a
    "masks" entry); `set_masks` prunes and fixes the masks, `clear_masks` lifts them.

    Args:
        params: parameters or param groups, as torch.optim.SGD takes them.
        lr, momentum, dampening, weight_decay, nesterov, maximize: torch.optim.SGD's.
        foreach, fused: accepted for drop-in use and ignored: the masked step is always one
            fused pass.
        differentiable: must be False (a torch.optim.SGD with it gets the general masked step
            from `make_masked_`).

    Raises:
        ValueError: a parameter of another dtype than float32, float16 and bfloat16 (named by
            group and position); differentiable turned on; or torch.optim.SGD's own checks
            of the hyper-parameters.
    """

    _state_names = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None):
        # foreach/fused are accepted for drop-in use: the masked step is always one fused pass.
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, differentiable=differentiable)
        self._masks = {}

    def _read_state(self, group):
        return ("momentum_buffer",) if float(group["momentum"]) != 0 else ()

    def _state_for(self, group, p):
        """(bucket key: a first step, p's state, whether this created it). A new buffer is a
        copy of the first gradient in torch.optim, which is what a zero buffer gives on a step
        without dampening."""
        if float(group["momentum"]) == 0:
            return False, None, False
        state = self.state[p]
        fresh = state.get("momentum_buffer") is None
        if fresh:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return fresh, state, fresh

    def _launch(self, group, bucket, grads, grad_scale):
        momentum_buffers = bucket.states[0] if bucket.states else []
        _ops.masked_sgd_(
            bucket.params, grads, momentum_buffers, bucket.masks, step_lr(group),
            float(group["momentum"]), 0.0 if bucket.key else float(group["dampening"]),
            float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]),
            _scale_on(grad_scale, bucket.device))


class _MaskedAdamStep(_Masked):
    _state_names = ("exp_avg", "exp_avg_sq")

    def _read_state(self, group):
        return ("step", "exp_avg", "exp_avg_sq")

    def _state_for(self, group, p):
        state = self.state[p]
        created = not state
        if created:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return None, state, created

    def _share_state(self, bucket):
        bucket.counts = _shared_counts(bucket)

    def _launch(self, group, bucket, grads, grad_scale):
        step_counts, exp_avgs, exp_avg_sqs = bucket.states
        # Counted once every parameter of every group has passed the checks.
        if bucket.counts is not None:
            steps = bucket.counts.add_(1).tolist()
        else:
            torch._foreach_add_(step_counts, 1)
            steps = [float(step) for step in step_counts]
        beta1, beta2 = (float(beta) for beta in group["betas"])
        decoupled = group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))
        _ops.masked_adam_(
            bucket.params, grads, exp_avgs, exp_avg_sqs, bucket.masks, steps, step_lr(group),
            beta1, beta2, float(group["eps"]), float(group["weight_decay"]), bool(decoupled),
            bool(group["maximize"]), _scale_on(grad_scale, bucket.device))


def _shared_counts(bucket: Bucket) -> torch.Tensor | None:
    """A bucket's Adam step counts moved into one tensor, each state["step"] now a 0-d view
    of it, so that a step counts them with one add (a foreach add over CPU scalars is one
    kernel per tensor) and reads them with one copy. Returns it; None, leaving the counts as
    they are, unless they are distinct 0-d CPU tensors of one dtype."""
    steps = bucket.states[0]
    kinds = set(zip(map(_DTYPE, steps), map(_DEVICE, steps), map(torch.Tensor.dim, steps)))
    if len(kinds) != 1 or kinds.pop()[1:] != (_CPU, 0) or len(set(map(id, steps))) < len(steps):
        return None
    counts = torch.stack(steps)
    bucket.states[0] = list(counts.unbind())
    for state, view in zip(bucket.state_dicts, bucket.states[0]):
        state["step"] = view
    return counts


class MaskedAdam(_MaskedAdamStep, torch.optim.Adam):
    """torch.optim.Adam whose step keeps masked-out weights and both moments exactly 0.

    Constructor, defaults, param groups, state and state_dict are torch.optim.Adam's (plus a
    "masks" entry); `set_masks` prunes and fixes the masks, `clear_masks` lifts them.

    Args:
        params: parameters or param groups, as torch.optim.Adam takes them.
        lr, betas, eps, weight_decay, maximize, decoupled_weight_decay: torch.optim.Adam's.
        amsgrad, capturable, differentiable: must be False (a torch.optim optimizer with them
            gets the general masked step from `make_masked_`).
        foreach, fused: accepted for drop-in use (foreach is kept in the param groups and
            checked as torch checks it) and ignored: the masked step is always one fused pass.

    Raises:
        ValueError: a parameter of another dtype than float32, float16 and bfloat16 (named by
            group and position); amsgrad, capturable or differentiable turned on; or
            torch.optim.Adam's own checks of the hyper-parameters.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._masks = {}


class MaskedAdamW(_MaskedAdamStep, torch.optim.AdamW):
    """torch.optim.AdamW whose step keeps masked-out weights and both moments exactly 0.

    Constructor, defaults, param groups, state and state_dict are torch.optim.AdamW's (plus a
    "masks" entry); `set_masks` prunes and fixes the masks, `clear_masks` lifts them.

    Args:
        params: parameters or param groups, as torch.optim.AdamW takes them.
        lr, betas, eps, weight_decay, maximize: torch.optim.AdamW's.
        amsgrad, capturable, differentiable: must be False (a torch.optim optimizer with them
            gets the general masked step from `make_masked_`).
        foreach, fused: accepted for drop-in use (foreach is kept in the param groups and
            checked as torch checks it) and ignored: the masked step is always one fused pass.

    Raises:
        ValueError: a parameter of another dtype than float32, float16 and bfloat16 (named by
            group and position); amsgrad, capturable or differentiable turned on; or
            torch.optim.AdamW's own checks of the hyper-parameters.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable)
        self._masks = {}
