"""The validated public functions of dsd_kernels.

Every function validates its input (a ValueError naming the tensor, nothing modified), then
calls one `torch.ops.dsd` op, whose kernel the dispatcher picks by device from the selected
backend (`use_backend`, env `DSD_BACKEND`). See docs/design.md for the semantics all backends
share.
"""

import math
import numbers
from collections.abc import Sequence

import torch

from . import _checks, _ops, distributed  # noqa: F401  (_ops defines the ops)
from ._checks import SCOPES
from .backends import ensure_selected as _ensure_selected

__all__ = ["kth_smallest_abs", "magnitude_masks", "nm_masks", "nm_eligible", "nonzero_masks",
           "apply_masks_",
           "fill_pruned_", "masked_sgd_", "masked_adam_", "pruned_count", "check_sparsity",
           "SCOPES"]


def check_sparsity(value) -> float:
    """`value` as a float if it is a sparsity dsd can prune to (a finite number in [0, 1));
    otherwise a ValueError saying so."""
    return _checks.sparsity(value)


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of `numel` entries a sparsity prunes: floor(sparsity * numel), in double."""
    return math.floor(sparsity * numel)


def _pruned_counts(numels: list, scope: str, sparsity, pruned, label) -> list:
    """The entries to prune of each segment (one per tensor for "layer", one for "global")
    from a checked sparsity, or the explicit counts `pruned` after checking them."""
    totals = numels if scope == "layer" else [sum(numels)]
    if sparsity is not None:
        return [pruned_count(sparsity, n) for n in totals]
    return _checks.pruned(pruned, totals, scope, label)


_ops_ = torch.ops.dsd


def kth_smallest_abs(xs, k: int | Sequence[int], *, names: Sequence[str] | None = None,
                     process_group=None) -> torch.Tensor:
    """The exact k-th smallest |x| over one tensor or a list of tensors.

    With `k` a list of one int per tensor, each tensor is ranked on its own and a 1-D tensor
    holds the thresholds, all found in one call (the per-layer thresholds). FSDP2 parameters
    (DTensors) are recognised and use their mesh's group. Meta tensors give a meta result.

    Args:
        xs: a float32/float16/bfloat16 tensor, or a list of them on one device.
        k: the rank over all of `xs`, in [1, N]; or one rank per tensor, k[i] in
            [1, xs[i].numel()].
        names: one name per tensor, used only by error messages.
        process_group: `xs` are this rank's shards and the result is over the gathered
            tensors (`dsd_kernels.distributed`); every rank of the group must call it.

    Returns:
        A 0-dim tensor (a 1-D tensor for a list `k`) on the inputs' device, in their promoted
        dtype.

    Raises:
        ValueError: `xs` is empty, not tensors, of another dtype, layout or device than
            supported; `k` is out of range or not an integer; a tensor holds NaN or Inf.
    """
    xs, mesh_group = distributed.unshard(xs)
    process_group = process_group if process_group is not None else mesh_group
    if process_group is not None:
        return distributed.kth_smallest_abs(xs, k, process_group, names=names)
    xs, label = _checks.weights(xs, names)
    numels = [x.numel() for x in xs]
    per_tensor = isinstance(k, (list, tuple))
    k = _checks.ranks(k, numels, label) if per_tensor else _checks.rank(k, sum(numels))
    _checks.finite(xs, label)
    _ensure_selected()
    with torch.no_grad():
        if per_tensor:
            return _ops_.kth_smallest_abs_per_tensor(xs, k)
        return _ops_.kth_smallest_abs(xs, k)


def magnitude_masks(xs, sparsity: float | None = None, scope: str = "layer", *,
                    pruned: int | Sequence[int] | None = None,
                    names: Sequence[str] | None = None, process_group=None):
    """Bool masks (True = kept) that prune exactly floor(sparsity * N) smallest-|x| entries.

    Ties are pruned in position order (lower flat index, then earlier tensor). FSDP2
    parameters (DTensors) are recognised: their local masks are returned.

    Args:
        xs: a float32/float16/bfloat16 tensor, or a list of them on one device.
        sparsity: the share to prune, in [0, 1); N is each tensor's numel for
            `scope="layer"`, the total for `"global"`. Give this or `pruned`.
        scope: "layer" prunes each tensor on its own (the paper); "global" ranks all of them
            together.
        pruned: the counts themselves instead of a sparsity: one int per tensor for "layer"
            (an int for a single tensor), one int for "global", each in [0, N].
        names: one name per tensor, used only by error messages.
        process_group: `xs` are this rank's shards (rank order = position order) and the masks
            returned are the local shards of the gathered tensors' masks; every rank of the
            group must call it.

    Returns:
        A mask for a tensor, a list of masks (bool, contiguous, shaped like each tensor) for a
        list.

    Raises:
        ValueError: both or neither of `sparsity` and `pruned`; a sparsity outside [0, 1) or a
            count outside [0, N]; an unknown scope; `xs` empty, not tensors, or of an
            unsupported dtype, layout or device; a tensor holds NaN or Inf.
    """
    if (sparsity is None) == (pruned is None):
        raise ValueError("give either sparsity or pruned (the counts), not "
                         + ("both" if pruned is not None else "neither"))
    sparsity = None if sparsity is None else _checks.sparsity(sparsity)
    scope = _checks.scope(scope)
    single = isinstance(xs, torch.Tensor)
    if single and scope == "layer" and pruned is not None and not isinstance(pruned, (list, tuple)):
        pruned = [pruned]  # one tensor: its count as an int
    xs, mesh_group = distributed.unshard(xs)
    process_group = process_group if process_group is not None else mesh_group

    def counts(numels, label):
        return _pruned_counts(numels, scope, sparsity, pruned, label)

    if process_group is not None:
        masks = distributed.magnitude_masks(xs, counts, scope, process_group, names=names)
        return masks[0] if single else masks
    xs, label = _checks.weights(xs, names)
    ks = counts([x.numel() for x in xs], label)
    _checks.finite(xs, label)
    _ensure_selected()
    with torch.no_grad():
        masks = _ops_.magnitude_masks(xs, ks, scope)
    return masks[0] if single else list(masks)


def nm_masks(xs, pattern, *, names: Sequence[str] | None = None):
    """N:M masks (True = kept): in every group of M consecutive entries along dim 1, the N
    largest |x| are kept.

    Dim 1 is the dimension a weight's GEMM reduces over: in_features of a Linear weight
    (out, in), in_channels of a Conv weight (out, in, kh, kw), as NVIDIA's ASP groups conv
    weights and as torch's semi-structured layout groups the rows of a 2-D weight. Among
    equal |x| the lower index along dim 1 is pruned first, as `magnitude_masks` prunes ties
    in position order. Inf is the largest magnitude.

    Args:
        xs: a float32/float16/bfloat16 tensor, or a list of them on one device, each with 2+
            dims and its dim-1 size a multiple of M.
        pattern: "N:M" (e.g. "2:4") or an (n, m) pair, 1 <= N < M <= 64.
        names: one name per tensor, used only by error messages.

    Returns:
        A mask for a tensor, a list of masks (bool, contiguous, shaped like each tensor) for a
        list.

    Raises:
        ValueError: a malformed pattern; `xs` empty, not tensors, or of an unsupported dtype,
            layout or device; a tensor with fewer than 2 dims or whose dim-1 size is not a
            multiple of M (see `nm_eligible`); a tensor holds NaN.
    """
    n, m = _checks.pattern(pattern)
    single = isinstance(xs, torch.Tensor)
    xs, label = _checks.weights(xs, names)
    _checks.nm_shapes(xs, m, label)
    _ensure_selected()
    with torch.no_grad():
        try:
            masks = _ops_.nm_masks(xs, n, m)
        except ValueError:
            # The kernels find a NaN while they rank (no pass of its own); the message names
            # the tensor as the caller does.
            _checks.no_nan(xs, label)
            raise
    return masks[0] if single else list(masks)


def nm_eligible(x: torch.Tensor, pattern) -> bool:
    """Whether `nm_masks(x, pattern)` accepts x's shape: 2+ dims and its dim-1 size a multiple
    of M (whole-model pruning leaves the others dense).

    Args:
        x: a tensor (only its shape is read).
        pattern: "N:M" or an (n, m) pair, as `nm_masks` takes it.

    Raises:
        ValueError: a malformed pattern, or `x` is not a tensor.
    """
    _, m = _checks.pattern(pattern)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, not {type(x).__name__}")
    return _checks.nm_eligible(x, m)


def nonzero_masks(xs, *, names: Sequence[str] | None = None):
    """Masks (True = kept) of the entries that are not zero: the masks of a model that is
    already sparse (pruned and saved with exact zeros), read in one pass over all of `xs`.

    +0.0 and -0.0 are both zeros (pruned); Inf is kept. FSDP2 parameters (DTensors) give the
    masks of their local shards: each entry is decided on its own, so no rank needs another's.

    Args:
        xs: a float32/float16/bfloat16 tensor, or a list of them on one device (0-d and empty
            tensors included).
        names: one name per tensor, used only by error messages.

    Returns:
        A mask for a tensor, a list of masks (bool, contiguous, shaped like each tensor) for a
        list.

    Raises:
        ValueError: `xs` empty, not tensors, or of an unsupported dtype, layout or device; a
            tensor holds NaN (neither a zero nor a weight to keep).
    """
    single = isinstance(xs, torch.Tensor)
    xs = [distributed.local_tensor(x) for x in _checks.tensor_list(xs, "xs")]
    xs, label = _checks.weights(xs, names)
    _ensure_selected()
    with torch.no_grad():
        try:
            masks = _ops_.nonzero_masks(xs)
        except ValueError:
            # The kernels find a NaN in their one pass; the message names the tensor as the
            # caller does.
            _checks.no_nan(xs, label, _ops.NAN_IS_NO_WEIGHT)
            raise
    return masks[0] if single else list(masks)


def apply_masks_(xs, masks) -> None:
    """In place: x[~mask] = 0 (as +0.0) for each tensor and its bool mask.

    Args:
        xs: a float32/float16/bfloat16 tensor or a list of them on one device (for a DTensor,
            its local shard is written).
        masks: one bool mask (True = kept) per tensor, shaped like it, on its device.

    Raises:
        ValueError: the lists differ in length; a tensor of an unsupported dtype, layout or
            device; a mask that is not bool or not shaped like its tensor or on another
            device. Nothing is written then.
    """
    xs, masks = _masked_tensors(xs, masks)
    _ensure_selected()
    with torch.no_grad():
        _ops_.apply_masks_(xs, masks)


def fill_pruned_(xs, masks, values) -> None:
    """In place: x[~mask] = value for each tensor, its bool mask and its value; kept entries
    are untouched. The value is rounded to the tensor's dtype as `torch.Tensor.fill_` rounds
    it; `fill_pruned_(xs, masks, 0.0)` is `apply_masks_(xs, masks)`.

    Args:
        xs: a float32/float16/bfloat16 tensor or a list of them on one device (for a DTensor,
            its local shard is written).
        masks: one bool mask (True = kept) per tensor, shaped like it, on its device.
        values: one real number per tensor, or one for all; -0.0, Inf and NaN are written as
            given.

    Raises:
        ValueError: as apply_masks_; values of another length than xs, not real numbers, or
            finite but beyond the range of their tensor's dtype. Nothing is written then.
    """
    xs, masks = _masked_tensors(xs, masks)
    if isinstance(values, (numbers.Real, torch.Tensor)):
        values = [values] * len(xs)
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"values must be a number or a list of numbers, not "
                         f"{type(values).__name__}")
    _checks.same_length(values, "values", xs, "xs")
    values = [_checks.fill_value(v, x.dtype, f"values[{i}]", f"xs[{i}]")
              for i, (v, x) in enumerate(zip(values, xs))]
    _ensure_selected()
    with torch.no_grad():
        _ops_.fill_pruned_(xs, masks, values)


def _masked_tensors(xs, masks):
    """Validate a list of tensors and one mask per tensor; returns them as lists (a DTensor
    as its local shard)."""
    xs = [distributed.local_tensor(x) for x in _checks.tensor_list(xs, "xs")]
    masks = _checks.tensor_list(masks, "masks")
    _checks.same_length(masks, "masks", xs, "xs")
    label = _checks.Names("xs")
    _checks.float_tensors(xs, label)
    for i, (x, mask) in enumerate(zip(xs, masks)):
        _checks.mask_for(mask, x, f"masks[{i}]", label(i))
    return xs, masks


def _optimizer_lists(params, grads, states: dict, masks):
    """Validate the tensor lists of one masked optimizer call; returns them as lists."""
    params = _checks.tensor_list(params, "params")
    label = _checks.Names("params")
    _checks.float_tensors(params, label)
    lists = {"grads": _checks.tensor_list(grads, "grads")}
    lists.update({what: _checks.tensor_list(ts, what) for what, ts in states.items()})
    for what, ts in lists.items():
        _checks.same_length(ts, what, params, "params")
        for i, (t, p) in enumerate(zip(ts, params)):
            _checks.like(t, p, f"{what}[{i}]", label(i))
    if masks is None:
        masks = [None] * len(params)
    else:
        masks = _checks.tensor_list(masks, "masks", allow_none=True)
        _checks.same_length(masks, "masks", params, "params")
        for i, (mask, p) in enumerate(zip(masks, params)):
            if mask is not None:
                _checks.mask_for(mask, p, f"masks[{i}]", label(i))
    return params, lists, masks


def masked_sgd_(params, grads, momentum_buffers, masks, *, lr: float, momentum: float = 0.0,
                dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                maximize: bool = False, grad_scale: torch.Tensor | None = None) -> None:
    """One SGD step (torch.optim.SGD's math) in place, with pruned weights and momentum set to 0.

    torch.optim starts a buffer as a copy of the gradient, which is what a zero buffer gives
    with dampening=0, so pass dampening=0 on the step that creates the buffers.

    Args:
        params: the parameters (float32/float16/bfloat16, one device), updated in place.
        grads: one gradient per parameter, of its shape, dtype and device.
        momentum_buffers: one buffer per parameter, like it (None or [] when momentum is 0).
        masks: None, or one bool mask (True = kept) or None per parameter.
        lr, momentum, dampening, weight_decay, nesterov, maximize: torch.optim.SGD's.
        grad_scale: a one-element float tensor that divides the gradients (GradScaler's), or
            None.

    Raises:
        ValueError: a hyper-parameter out of range or not finite; nesterov without momentum
            or with dampening; lists of other lengths; a tensor of another shape, dtype or
            device than its parameter; a bad mask or grad_scale. Nothing is written then.
    """
    lr = _checks.real(lr, "lr", 0.0)
    momentum = _checks.real(momentum, "momentum", 0.0)
    dampening = _checks.real(dampening, "dampening")
    weight_decay = _checks.real(weight_decay, "weight_decay", 0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
    states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    if momentum == 0 and momentum_buffers:
        raise ValueError("momentum_buffers given but momentum is 0; pass None or []")
    params, lists, masks = _optimizer_lists(params, grads, states, masks)
    grad_scale = _checks.grad_scale(grad_scale, params[0].device)
    _ensure_selected()
    with torch.no_grad():
        _ops_.masked_sgd_(params, lists["grads"], lists.get("momentum_buffers", []), masks,
                          lr, momentum, dampening, weight_decay, bool(nesterov), bool(maximize),
                          grad_scale)


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, steps, *, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float = 0.0, decoupled: bool = False,
                 maximize: bool = False, grad_scale: torch.Tensor | None = None) -> None:
    """One Adam step (decoupled=True: AdamW) in place, with pruned weights and both moments 0.

    Args:
        params: the parameters (float32/float16/bfloat16, one device), updated in place.
        grads: one gradient per parameter, of its shape, dtype and device.
        exp_avgs, exp_avg_sqs: the first and second moments, one per parameter, like it.
        masks: None, or one bool mask (True = kept) or None per parameter.
        steps: this update's step number for each parameter, counted from 1 as torch.optim
            counts after incrementing (one number applies to all); read, not modified.
        lr, beta1, beta2, eps, weight_decay, maximize: torch.optim.Adam's.
        decoupled: AdamW's decoupled weight decay.
        grad_scale: a one-element float tensor that divides the gradients (GradScaler's), or
            None.

    Raises:
        ValueError: a hyper-parameter or step out of range or not finite; lists of other
            lengths; a tensor of another shape, dtype or device than its parameter; a bad mask
            or grad_scale. Nothing is written then.
    """
    lr = _checks.real(lr, "lr", 0.0)
    beta1 = _checks.real(beta1, "beta1", 0.0, 1.0, high_open=True)
    beta2 = _checks.real(beta2, "beta2", 0.0, 1.0, high_open=True)
    eps = _checks.real(eps, "eps", 0.0)
    weight_decay = _checks.real(weight_decay, "weight_decay", 0.0)
    params, lists, masks = _optimizer_lists(
        params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, masks)
    if isinstance(steps, (numbers.Real, torch.Tensor)):
        steps = [steps] * len(params)
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"steps must be a number or a list of numbers, not {type(steps).__name__}")
    _checks.same_length(steps, "steps", params, "params")
    steps = [_checks.real(s, f"steps[{i}]", 1.0) for i, s in enumerate(steps)]
    grad_scale = _checks.grad_scale(grad_scale, params[0].device)
    _ensure_selected()
    with torch.no_grad():
        _ops_.masked_adam_(params, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], masks,
                           steps, lr, beta1, beta2, eps, weight_decay, bool(decoupled),
                           bool(maximize), grad_scale)
