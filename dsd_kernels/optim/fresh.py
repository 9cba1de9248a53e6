"""What a fresh optimizer state holds at a pruned position, per parameter-shaped state entry:
torch.optim's classes from a table, every other class from a probe (docs/design.md, The
general masked step).

A pruned position is one that has only ever seen a 0 weight and a 0 gradient, so its state is
what the optimizer's own step leaves there from a fresh state under those inputs. Per-tensor
state (step counts, scalars) and state of other shapes (factored moments, flat histories) are
not entries here: the optimizer keeps them.
"""

import warnings
from collections import defaultdict

import torch

from .. import _checks


def _zero(hyper: dict) -> float:
    return 0.0


def _copied_gradient(hyper: dict) -> float:  # a copy of the gradient, negated under maximize
    return -0.0 if hyper.get("maximize") else 0.0


def _rprop_step_size(hyper: dict) -> float:  # a first step clamps lr into step_sizes
    low, high = hyper["step_sizes"]
    return min(max(float(hyper["lr"]), float(low)), float(high))


# Per torch.optim class, its parameter-shaped state and, from the step's hyper-parameters (lr
# already times dsd_lr_scale), the value its own step leaves at a 0 weight with 0 gradients.
# tests/test_any_optimizer.py checks that the probe finds the same values.
FRESH_STATE = {
    torch.optim.SGD: {"momentum_buffer": _copied_gradient},
    torch.optim.Adam: {"exp_avg": _zero, "exp_avg_sq": _zero, "max_exp_avg_sq": _zero},
    torch.optim.AdamW: {"exp_avg": _zero, "exp_avg_sq": _zero, "max_exp_avg_sq": _zero},
    torch.optim.Adadelta: {"square_avg": _zero, "acc_delta": _zero},
    torch.optim.Adafactor: {"variance": _zero},  # row_var, col_var: factored, not filled
    torch.optim.Adagrad: {"sum": lambda hyper: float(hyper["initial_accumulator_value"])},
    # exp_inf = max(beta2 * exp_inf, |grad| + eps): eps from the first step on
    torch.optim.Adamax: {"exp_avg": _zero, "exp_inf": lambda hyper: float(hyper["eps"])},
    torch.optim.ASGD: {"ax": _zero},
    torch.optim.LBFGS: {},  # its state is one flat history for the whole group
    torch.optim.Muon: {"momentum_buffer": _zero},
    torch.optim.NAdam: {"exp_avg": _zero, "exp_avg_sq": _zero},
    torch.optim.RAdam: {"exp_avg": _zero, "exp_avg_sq": _zero},
    torch.optim.RMSprop: {"square_avg": _zero, "momentum_buffer": _zero, "grad_avg": _zero},
    torch.optim.Rprop: {"prev": _copied_gradient, "step_size": _rprop_step_size},
}

_PROBES: dict = {}  # (class, hyper-parameters, ndim, dtype, device type) -> probe's values
_MAX_PROBES = 4096  # a schedule probing at every new lr must not grow it without bound


def fresh_values(base: type, hyper: dict, defaults: dict, ndim: int, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """{state name: value} for the parameter-shaped state of a parameter of `ndim`
    dimensions and `dtype` on `device`, in a group of optimizer class `base` with the step's
    hyper-parameters `hyper` (no "params"); `defaults` are the optimizer's.

    Raises:
        ValueError: the probe of a class outside FRESH_STATE failed (one line, naming why).
    """
    table = FRESH_STATE.get(base)
    if table is not None:
        return {name: value(hyper) for name, value in table.items()}
    try:
        key = (base, _frozen(hyper), ndim, dtype, device.type)
    except TypeError:  # a hyper-parameter that cannot be compared: probe every time
        return probe(base, hyper, defaults, ndim, dtype, device)
    found = _PROBES.get(key)
    if found is None:
        found = probe(base, hyper, defaults, ndim, dtype, device)
        if len(_PROBES) >= _MAX_PROBES:
            _PROBES.clear()
        _PROBES[key] = found
    return found


def probe(base: type, hyper: dict, defaults: dict, ndim: int, dtype: torch.dtype,
          device: torch.device) -> dict:
    """Step a fresh `base` on a small zero parameter (of `ndim` dimensions, at least one, of
    `dtype`) with zero gradients, twice, resetting the weight to +0.0 after each step as the
    masked step does; returns {name: value} of its state shaped like the parameter, which must
    be one value across elements and both steps. On CPU, else (a class that cannot step there)
    on `device`.

    Raises:
        ValueError: the fresh instance cannot be built or stepped, or such a state varies
            across elements or steps, or has a dtype dsd's kernels cannot fill.
    """
    name = f"{base.__module__}.{base.__qualname__}"
    devices = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    for i, where in enumerate(devices):
        try:
            states = _probe_states(base, hyper, defaults, ndim, dtype, where)
            break
        except Exception as error:  # any failure of third-party code: refuse in one line
            if i + 1 == len(devices):
                reason = str(error).strip().splitlines()
                raise ValueError(
                    f"cannot mask {name}: finding its fresh state (a fresh {base.__name__} "
                    f"stepping a zero parameter with zero gradients) raised "
                    f"{type(error).__name__}{': ' + reason[0] if reason else ''}") from error
    first, second = states
    values = {}
    for key, t in second.items():
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"cannot mask {name}: its state {key!r} is shaped like the "
                             f"parameter but has dtype {t.dtype}, which dsd's kernels cannot "
                             "fill (float32, float16, bfloat16)")
        bits, before = _bits(t).flatten(), first.get(key)
        if not ((bits == bits[0]).all() and before is not None
                and torch.equal(_bits(before).flatten(), bits)):
            raise ValueError(f"cannot mask {name}: its state {key!r} at a weight that only "
                             "ever sees 0 is not one value across elements and steps, so there "
                             "is no fresh value to reset pruned positions to")
        values[key] = t.flatten()[0].item()
    return values


def _probe_states(base, hyper, defaults, ndim, dtype, device) -> list:
    x = torch.zeros(tuple(range(2, 2 + max(ndim, 1))), dtype=dtype, device=device,
                    requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user saw the constructor's warnings already
        try:
            optimizer = base([x], **defaults)
        except TypeError:  # a constructor that does not take its defaults: build as unpickled
            optimizer = base.__new__(base)
            optimizer.__setstate__({"defaults": dict(defaults), "state": defaultdict(dict),
                                    "param_groups": [{**defaults, "params": [x]}]})
        optimizer.param_groups[0].update(hyper)
        step = base.step
        step = step.__wrapped__ if getattr(step, "hooked", False) else step  # no user hooks
        states = []
        for _ in range(2):
            x.grad = torch.zeros_like(x)
            step(optimizer, lambda: torch.zeros((), device=device))
            with torch.no_grad():
                x.zero_()
            states.append({key: t.detach().cpu().clone()
                           for key, t in optimizer.state.get(x, {}).items()
                           if isinstance(t, torch.Tensor) and t.shape == x.shape})
    return states


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: NaN equals NaN, -0.0 differs from +0.0."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _frozen(value):
    """A hashable stand-in for a hyper-parameter (TypeError for one that has none)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.flatten().tolist()))
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in sorted(value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(map(_frozen, value)))
    hash(value)
    return value
