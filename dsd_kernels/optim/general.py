"""The general masked step: any torch.optim.Optimizer's own step between multi-tensor passes of
dsd's kernels (docs/design.md, The general masked step).

Before the step (and after every evaluation of a closure the step is given) the gradients of
masked parameters are set to +0.0 at pruned positions; after it the parameters are, and every
parameter-shaped state tensor holds what a fresh state holds there (`fresh.fresh_values`), so
a pruned weight regrows from 0 under a fresh optimizer's state.
"""

import numbers

import torch

from .. import _checks
from ..distributed import local_tensor
from ..functional import apply_masks_, fill_pruned_
from .fresh import fresh_values
from .masked import LR_SCALE, _dtype_error, _Masked, _parameter

_STALE_STEP = ("an unmasked step was called on a masked optimizer: something still holds the "
               "step method it had before make_masked_ converted it; create that wrapper after "
               "converting, or call optimizer.step() itself")


# torch.optim's classes whose update at a position reads only that position's gradient,
# weight and state, plus per-tensor scalars no gradient sets (docs/design.md, The general
# masked step): the fill after their step resets all that a pruned gradient reached, so their
# gradients get no pass before it. Subclasses and other classes are not known to be so.
ELEMENTWISE = frozenset({
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adadelta,
    torch.optim.Adagrad, torch.optim.Adamax, torch.optim.ASGD, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
})


class _MaskedGeneral(_Masked):
    """Masks on an optimizer whose own step does the update (mixed in before its class, the
    `_base`, by `masked_class`)."""

    _base: type = torch.optim.Optimizer  # the class whose step runs
    _step_supports_amp_scaling = False  # GradScaler unscales the gradients itself
    _in_step = False  # True while step runs the base class's own step
    _entered = False  # True from step() to its end: the stale-step hook lets it through

    def _refuse_flags(self, settings, where):
        """Nothing to refuse: the base class's own step implements every flag."""

    def _init_group(self, *args, **kwargs):
        if not self._in_step:  # torch's step reached without the masking around it
            return super()._init_group(*args, **kwargs)
        return self._base._init_group(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickle rebuilds it from the base class.
        return _rebuild, (self._base,), self.__getstate__()

    def step(self, closure=None):
        """The masked step (torch's step hooks run around it, as for any optimizer)."""
        self._entered = True
        try:
            return self._hooked_step(closure)
        finally:
            self._entered = False

    step.hooked = True  # _patch_step_function: the hooks are in _hooked_step

    @torch.no_grad()
    def _masked_step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p in self._masks]
        for p in params:  # before anything changes
            if p.dtype not in _checks.FLOAT_DTYPES:
                raise _dtype_error(self._name(p), p.dtype)
            if self._masks[p].device != p.device:
                raise ValueError(f"the mask of {self._name(p)} is on {self._masks[p].device} "
                                 f"but the parameter moved to {p.device}; call set_masks again "
                                 "after moving it")
        fresh = self._fresh(params)  # a probe may refuse
        if self._base in ELEMENTWISE:
            self._refuse_sparse_gradients(params)
            args = () if closure is None else (closure,)
        elif closure is None:
            self._mask_gradients(params)
            args = ()
        else:
            args = (self._masking_closure(closure, params),)
        base_step = self._base.step
        if getattr(base_step, "hooked", False):  # without the step hooks: they ran already
            base_step = base_step.__wrapped__
        lrs = [group["lr"] for group in self.param_groups]
        try:
            self._in_step = True
            for group in self.param_groups:
                scale = float(group.get(LR_SCALE, 1.0))
                if scale != 1.0:
                    group["lr"] = group["lr"] * scale
            loss = base_step(self, *args)
        finally:
            self._in_step = False
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr
        self._fill(params, fresh)
        return loss

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_masked_step)

    def _masking_closure(self, closure, params):
        """The closure, masking the gradients after each evaluation (LBFGS evaluates it many
        times in one step)."""
        def masked_closure():
            with torch.enable_grad():
                loss = closure()
            self._mask_gradients(params)
            return loss
        return masked_closure

    def _refuse_sparse_gradients(self, params: list) -> list:
        """The masked `params` that have a gradient, all checked to be dense."""
        masked = [p for p in params if p.grad is not None]
        for p in masked:
            if p.grad.is_sparse:
                raise ValueError(f"{self._name(p)} has a sparse gradient; the masked optimizers "
                                 "need dense gradients")
        return masked

    def _mask_gradients(self, params: list) -> None:
        """The gradients of the masked `params` (checked by the step) at +0.0 at pruned
        positions: all checked to be dense, then one pass per device."""
        masked = self._refuse_sparse_gradients(params)
        for device_params in _by_device(masked).values():
            apply_masks_([local_tensor(p.grad) for p in device_params],
                         [self._masks[p] for p in device_params])

    def _name(self, p) -> str:
        """How errors call parameter p."""
        return next(_parameter(index, i, group.get("param_names"))
                    for index, group in enumerate(self.param_groups)
                    for i, q in enumerate(group["params"]) if q is p)

    def _fresh(self, params: list) -> list:
        return fresh_state(self._base, self, params)

    def _prune(self, masks: dict) -> None:
        params = list(masks)
        self._fill(params, self._fresh(params), masks)
        if isinstance(self, torch.optim.LBFGS):
            # Its history (directions, steps, the last gradient) is flat over all parameters,
            # with values at the newly pruned positions that would move pruned weights inside
            # the next step's closure evaluations: start it afresh, as a new LBFGS would.
            self.state.pop(self._params[0], None)

    def _fill(self, params: list, fresh: list, masks=None) -> None:
        """The `params` at +0.0 and their parameter-shaped state at its fresh values at
        pruned positions: one pass per device."""
        masks = self._masks if masks is None else masks
        by_device: dict = {}
        for p, values in zip(params, fresh):
            targets, mask_list, fills = by_device.setdefault(p.device, ([], [], []))
            state = self.state.get(p, {})
            targets.append(local_tensor(p))
            fills.append(0.0)
            for name, value in values.items():
                t = state.get(name)
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    targets.append(local_tensor(t))
                    fills.append(value)
            mask_list += [masks[p]] * (len(targets) - len(mask_list))
        for targets, mask_list, fills in by_device.values():
            fill_pruned_(targets, mask_list, fills)


def fresh_state(base: type, optimizer, params: list) -> list:
    """Per parameter of `optimizer` (of class `base`, or its masked class), {state name: its
    fresh value} (fresh.fresh_values) for its group's step: lr times dsd_lr_scale."""
    group_of = {p: (i, group) for i, group in enumerate(optimizer.param_groups)
                for p in group["params"]}
    found, hypers, known = [], {}, {}
    for p in params:
        index, group = group_of[p]
        kind = (index, p.dim(), p.dtype, p.device)
        if kind in known:
            found.append(known[kind])
            continue
        hyper = hypers.get(index)
        if hyper is None:
            hyper = hypers[index] = {k: v for k, v in group.items()
                                     if k not in ("params", "param_names", LR_SCALE)}
            scale = float(group.get(LR_SCALE, 1.0))
            if scale != 1.0:
                if not isinstance(hyper.get("lr"), (numbers.Real, torch.Tensor)):
                    raise ValueError(
                        f"param group {index} has lr={hyper.get('lr')!r}, which "
                        f"{LR_SCALE}={scale} cannot scale: the optimizer sets its own step "
                        "size (e.g. Adafactor's relative_step)")
                hyper["lr"] = hyper["lr"] * scale
        known[kind] = fresh_values(base, hyper, optimizer.defaults, p.dim(), p.dtype, p.device)
        found.append(known[kind])
    return found


def refuse_stale_step(optimizer, args, kwargs) -> None:
    """A step pre-hook: the step of the class from before make_masked_ (held by a wrapper)
    runs the hooks without entering the masked step; refuse before it updates anything."""
    if not optimizer._entered:
        raise RuntimeError(_STALE_STEP)


def _by_device(params: list) -> dict:
    by_device: dict = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    return by_device


_CLASSES: dict = {}


def masked_class(base: type) -> type:
    """The masked class of an optimizer class: its step between dsd's passes (one per class,
    made once)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Masked{base.__name__}", (_MaskedGeneral, base),
                              {"__module__": __name__, "_base": base})
    return _CLASSES[base]


def _rebuild(base: type):
    """An empty instance of base's masked class, for pickle to set the state of."""
    cls = masked_class(base)
    return cls.__new__(cls)
