"""The exact masked step of torch.optim's element-wise optimizers other than SGD, Adam and
AdamW: the optimizer's own step between two multi-tensor passes of dsd's kernels
(docs/design.md, The general masked step).

Before the step the gradients of masked parameters are set to +0.0 at pruned positions; after
it the parameters are, and every parameter-shaped state tensor holds what a fresh state holds
there (`FRESH_STATE`), so a pruned weight regrows from 0 under a fresh optimizer's state.
"""

import torch

from .. import _checks
from ..distributed import local_tensor
from ..functional import apply_masks_, fill_pruned_
from .masked import LR_SCALE, _dtype_error, _Masked, _parameter

# Per optimizer class, its parameter-shaped state and what a fresh state holds there: None
# for 0, else the param-group entry it starts at (torch.optim's _init_group or constructor).
FRESH_STATE = {
    torch.optim.SGD: {"momentum_buffer": None},
    torch.optim.Adam: {"exp_avg": None, "exp_avg_sq": None, "max_exp_avg_sq": None},
    torch.optim.AdamW: {"exp_avg": None, "exp_avg_sq": None, "max_exp_avg_sq": None},
    torch.optim.Adadelta: {"square_avg": None, "acc_delta": None},
    torch.optim.Adagrad: {"sum": "initial_accumulator_value"},
    torch.optim.Adamax: {"exp_avg": None, "exp_inf": None},
    torch.optim.ASGD: {"ax": None},
    torch.optim.NAdam: {"exp_avg": None, "exp_avg_sq": None},
    torch.optim.RAdam: {"exp_avg": None, "exp_avg_sq": None},
    torch.optim.RMSprop: {"square_avg": None, "momentum_buffer": None, "grad_avg": None},
    torch.optim.Rprop: {"prev": None, "step_size": "lr"},
}


class _MaskedGeneral(_Masked):
    """Masks on a torch.optim optimizer whose own step does the update (mixed in before the
    torch class by `masked_class`)."""

    _step_supports_amp_scaling = False  # GradScaler unscales the gradients itself
    _fresh: dict = {}  # the class's FRESH_STATE entry
    _in_step = False  # True while step runs the torch class's own step

    def _refuse_flags(self, settings, where):
        """Nothing to refuse: the torch class's own step implements every flag."""

    def _init_group(self, *args, **kwargs):
        if not self._in_step:  # torch's step reached without the masking around it
            return super()._init_group(*args, **kwargs)
        return self._torch_class()._init_group(self, *args, **kwargs)

    @classmethod
    def _torch_class(cls) -> type:
        return next(c for c in cls.__mro__ if c in FRESH_STATE)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # before the gradients are masked
            with torch.enable_grad():
                loss = closure()
        masked = []
        for index, group in enumerate(self.param_groups):  # all checks before any update
            for i, p in enumerate(group["params"]):
                if p.grad is None or p not in self._masks:
                    continue
                what = _parameter(index, i, group.get("param_names"))
                if p.grad.is_sparse:
                    raise ValueError(f"{what} has a sparse gradient; the masked optimizers need "
                                     "dense gradients")
                if p.dtype not in _checks.FLOAT_DTYPES:
                    raise _dtype_error(what, p.dtype)
                if self._masks[p].device != p.device:
                    raise ValueError(f"the mask of {what} is on {self._masks[p].device} but the "
                                     f"parameter moved to {p.device}; call set_masks again "
                                     "after moving it")
                masked.append(p)
        for device_params in _by_device(masked).values():
            apply_masks_([local_tensor(p.grad) for p in device_params],
                         [self._masks[p] for p in device_params])
        lrs = [group["lr"] for group in self.param_groups]
        torch_step = self._torch_class().step
        if getattr(torch_step, "hooked", False):  # without the step hooks: they ran already
            torch_step = torch_step.__wrapped__
        try:
            self._in_step = True
            for group in self.param_groups:
                scale = float(group.get(LR_SCALE, 1.0))
                if scale != 1.0:
                    group["lr"] = group["lr"] * scale
            torch_step(self)
        finally:
            self._in_step = False
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr
        self._prune(masked)
        return loss

    def _prune(self, params: list) -> None:
        """The masked `params` at +0.0 and their parameter-shaped state at its fresh values
        at pruned positions: one pass per device."""
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        for device_params in _by_device(params).values():
            targets, masks, values = [], [], []
            for p in device_params:
                group, state, mask = group_of[p], self.state.get(p, {}), self._masks[p]
                targets.append(local_tensor(p))
                values.append(0.0)
                for name, start in self._fresh.items():
                    t = state.get(name)
                    if isinstance(t, torch.Tensor) and t.shape == p.shape:
                        targets.append(local_tensor(t))
                        values.append(0.0 if start is None else _fresh_value(group, start))
                masks += [mask] * (len(targets) - len(masks))
            fill_pruned_(targets, masks, values)


def _fresh_value(group: dict, key: str) -> float:
    value = float(group[key])
    return value * float(group.get(LR_SCALE, 1.0)) if key == "lr" else value


def _by_device(params: list) -> dict:
    by_device: dict = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    return by_device


_CLASSES: dict = {}


def masked_class(torch_class: type) -> type:
    """The masked class of a torch.optim class in FRESH_STATE (one per class, made once)."""
    if torch_class not in _CLASSES:
        _CLASSES[torch_class] = type(f"Masked{torch_class.__name__}",
                                     (_MaskedGeneral, torch_class),
                                     {"__module__": __name__, "_fresh": FRESH_STATE[torch_class]})
    return _CLASSES[torch_class]
