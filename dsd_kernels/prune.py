"""torch.nn.utils.prune, with its magnitude masks computed by dsd_kernels.

    from dsd_kernels import prune                      # instead of torch.nn.utils.prune
    prune.global_unstructured([(m, "weight") for m in layers], amount=0.5)
    prune.l1_unstructured(model.fc, "weight", amount=0.3)
    prune.mask_optimizer_(optimizer, model)            # weight_orig and its state stay 0
    prune.remove(model.fc, "weight")                   # torch's own, as every other name

The modules end up exactly as torch's functions leave them (`name_orig` parameter, `name_mask`
buffer, the forward pre-hook; `remove`, `is_pruned` and repeated pruning work as with torch).
What differs is the mask: the `amount` smallest |score| by our exact kernels, ties pruned in
position order (lower flat index, then earlier tensor), and the global ranking reads the
tensors where they are instead of concatenating scores and masks. Repeated pruning ranks the
entries still unpruned and keeps the old mask, as torch does; the count is torch's (an int
amount, or round(amount * unpruned)). `L1Unstructured` plugs the same masks into code that
takes a `pruning_method=` (torch's global_unstructured, Lightning's ModelPruning).

N:M structured pruning (2:4 and others), with the same module state:

    prune.nm_structured(model.fc, "weight", pattern="2:4")
    dense = prune.nm_structured_model(model, "2:4")   # every eligible weight, in one pass
    prune.NMStructured.apply(module, "weight", pattern="2:4")  # as a pruning method

In every group of M consecutive weights along dim 1 (the dimension a Linear or convolution
reduces over) the N largest |w| are kept (`dsd_kernels.nm_masks`); an earlier mask is kept
and the pattern is computed on the weight as that mask leaves it.
"""

import numbers
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune as _torch_prune
from torch.nn.utils.prune import (  # noqa: F401  (the rest of torch's module, as it is)
    BasePruningMethod,
    CustomFromMask,
    Identity,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
    custom_from_mask,
    identity,
    is_pruned,
    ln_structured,
    random_structured,
    random_unstructured,
    remove,
)

from . import _checks
from .functional import magnitude_masks, nm_eligible, nm_masks
from .optim import make_masked_

# The layers whose weight is a GEMM operand reducing over dim 1: the ones N:M pruning takes.
PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# torch's own class, as it is before anything replaces torch's name with this module's (the
# drop-in): global_unstructured accepts it whatever the name points at later.
_TORCH_L1_UNSTRUCTURED = _torch_prune.L1Unstructured

__all__ = [
    "L1Unstructured", "l1_unstructured", "global_unstructured", "mask_optimizer_",
    "NMStructured", "nm_structured", "nm_structured_model", "PRUNABLE_LAYERS",
    "BasePruningMethod", "CustomFromMask", "Identity", "LnStructured", "PruningContainer",
    "RandomStructured", "RandomUnstructured", "custom_from_mask", "identity", "is_pruned",
    "ln_structured", "random_structured", "random_unstructured", "remove",
]


def _check_amount(amount) -> None:
    """torch's rule: an int >= 0 (a count) or a real in [0, 1] (a fraction)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be an int (a count) or a float in [0, 1] (a fraction), "
                        f"got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"amount={amount} must be a non-negative count")
    elif not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"amount={amount} must be a fraction in [0, 1] or a non-negative int")


def _count(amount, unpruned: int, what: str) -> int:
    """Entries to prune out of `unpruned`, as torch counts them."""
    count = amount if isinstance(amount, numbers.Integral) else round(amount * unpruned)
    if count > unpruned:
        raise ValueError(f"amount={amount} is more than the {unpruned} unpruned entries of {what}")
    return int(count)


def _keep(scores: list, count: int, names) -> list:
    """Bool masks over `scores` keeping all but the `count` smallest |score| (ranked jointly)."""
    return magnitude_masks([s.detach() for s in scores], scope="global", pruned=count,
                           names=names)


class L1Unstructured(_TORCH_L1_UNSTRUCTURED):
    """torch's L1Unstructured (same arguments, same count), with the mask from dsd_kernels:
    exactly the `amount` smallest |t|, ties pruned in position order.

    Args:
        amount: an int (a count) or a float in [0, 1] (a fraction of the unpruned entries).

    Raises:
        TypeError, ValueError: torch's checks of `amount`; when a mask is computed, an amount
            over the unpruned entries, or a tensor dsd_kernels cannot rank (its dtype, NaN or
            Inf).
    """

    def compute_mask(self, t, default_mask):
        count = _count(self.amount, t.nelement(), "the tensor")
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if count:
            mask.masked_fill_(~_keep([t], count, None)[0], 0)
        return mask


def _pruned_state(module: nn.Module, name: str):
    """The current mask of module.name (None if unpruned), after checking the name."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to prune, got {type(module).__name__}")
    if not isinstance(name, str) or not isinstance(getattr(module, name, None), torch.Tensor):
        raise AttributeError(f"{type(module).__name__} has no parameter named {name!r} to prune")
    return getattr(module, name + "_mask", None)


def _scores(parameters, importance_scores) -> tuple[list, list, list, list]:
    """Validated (module, name) pairs, their scores, current masks and labels."""
    if not isinstance(parameters, Iterable):
        raise TypeError("parameters must be an iterable of (module, name) pairs")
    pairs = list(parameters)
    importance_scores = {} if importance_scores is None else importance_scores
    if not isinstance(importance_scores, dict):
        raise TypeError("importance_scores must be a dict {(module, name): tensor}")
    if not pairs:
        raise ValueError("parameters is empty: nothing to prune")
    scores, masks, labels = [], [], []
    for i, pair in enumerate(pairs):
        try:  # any pair, as torch unpacks them: a tuple, a list, ...
            module, name = pair
        except (TypeError, ValueError):
            raise TypeError(f"parameters must hold (module, name) pairs, got {pair!r}") from None
        pairs[i] = module, name
        masks.append(_pruned_state(module, name))
        param = getattr(module, name)
        label = f"{type(module).__name__}.{name}"
        score = importance_scores.get((module, name), param)
        if score is not param:
            _check_scores(score, param, label)
        scores.append(score)
        labels.append(label)
    return pairs, scores, masks, labels


def _check_scores(score, param, label: str) -> None:
    """Importance scores the kernels can rank in place of `param`."""
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"the importance scores of {label} must be a tensor, not "
                        f"{type(score).__name__}")
    if score.shape != param.shape:
        raise ValueError(f"the importance scores of {label} have shape {tuple(score.shape)}, "
                         f"not the parameter's {tuple(param.shape)}")
    if score.dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"the importance scores of {label} have dtype {score.dtype}; "
                         "dsd_kernels ranks float32, float16 or bfloat16 scores exactly "
                         "(convert them, e.g. scores.float())")


def _new_masks(scores, masks, labels, amount) -> list:
    """The masks after pruning `amount` of the unpruned entries, ranked jointly; each is the
    old mask with more zeros (bool where there was no old mask)."""
    candidates = [s if m is None else s[m == 1] for s, m in zip(scores, masks)]
    count = _count(amount, sum(c.numel() for c in candidates), "the parameters")
    keep = _keep(candidates, count, labels) if count else None
    new = []
    for i, (score, mask) in enumerate(zip(scores, masks)):
        if mask is None:
            new.append(keep[i] if keep else torch.ones(score.shape, dtype=torch.bool,
                                                       device=score.device))
            continue
        mask = mask.clone(memory_format=torch.contiguous_format)
        if keep:
            mask[mask == 1] = keep[i].to(mask.dtype)
        new.append(mask)
    return new


def global_unstructured(parameters, pruning_method=L1Unstructured, importance_scores=None,
                        **kwargs) -> None:
    """torch's global_unstructured: prune the smallest |score| of all `parameters` together,
    ranked across the tensors without concatenating them.

    Args:
        parameters: (module, name) pairs (tuples, lists: any pair).
        pruning_method: this module's L1Unstructured or torch's own (the default's masks);
            others are refused.
        importance_scores: {(module, name): tensor shaped like that parameter}; the
            parameter itself where absent.
        amount: (keyword) a count, or a fraction in [0, 1] of the unpruned entries.

    Raises:
        TypeError: another pruning method, other keywords than `amount`, a bad `amount` type,
            or `parameters` not (module, name) pairs.
        ValueError: a bad `amount`, or scores of another shape or dtype than supported, NaN or
            Inf. The modules are left as they were.
        AttributeError: a module without the named parameter.
    """
    if pruning_method not in (L1Unstructured, _TORCH_L1_UNSTRUCTURED, _torch_prune.L1Unstructured):
        raise TypeError(f"dsd_kernels.prune.global_unstructured computes L1 (magnitude) masks; "
                        f"for {getattr(pruning_method, '__name__', pruning_method)} use "
                        "torch.nn.utils.prune.global_unstructured")
    if set(kwargs) != {"amount"}:
        raise TypeError(f"global_unstructured takes amount= (and no other keyword), got "
                        f"{sorted(kwargs) or 'none'}")
    amount = kwargs["amount"]
    _check_amount(amount)
    pairs, scores, masks, labels = _scores(parameters, importance_scores)
    with torch.no_grad():
        new = _new_masks(scores, masks, labels, amount)
    for i, (module, name) in enumerate(pairs):
        mask, new[i] = new[i], None  # freed once it is the module's buffer
        custom_from_mask(module, name, mask=mask)
        # The hook's copy of the mask is read only while it is applied; point it at the
        # buffer (equal values) so the masks computed here are not held twice.
        _last_method(module, name).mask = getattr(module, name + "_mask")


def _last_method(module: nn.Module, name: str) -> BasePruningMethod:
    """The pruning method most recently applied to module.name."""
    hook = next(h for h in module._forward_pre_hooks.values()
                if isinstance(h, BasePruningMethod) and h._tensor_name == name)
    return hook._pruning_methods[-1] if isinstance(hook, PruningContainer) else hook


def l1_unstructured(module: nn.Module, name: str, amount, importance_scores=None) -> nn.Module:
    """torch's l1_unstructured, with the mask from dsd_kernels: prune the `amount` smallest
    |score| of module.name.

    Args:
        module: the module holding the parameter.
        name: the parameter's name ("weight").
        amount: a count, or a fraction in [0, 1] of the unpruned entries.
        importance_scores: a tensor shaped like the parameter, ranked instead of it.

    Returns:
        The module.

    Raises:
        TypeError: a bad `amount` type, or `module` not an nn.Module.
        ValueError: a bad `amount`, or scores of another shape or dtype than supported, NaN or
            Inf. The module is left as it was.
        AttributeError: the module has no parameter `name`.
    """
    _check_amount(amount)
    pairs, scores, masks, labels = _scores(
        [(module, name)],
        None if importance_scores is None else {(module, name): importance_scores})
    # Checked before torch's apply, which removes an earlier pruning's hook before it ranks.
    unpruned = scores[0].numel() if masks[0] is None else int((masks[0] == 1).sum())
    if _count(amount, unpruned, labels[0]):
        xs, label = _checks.weights([scores[0].detach()], labels)
        _checks.finite(xs, label)
    L1Unstructured.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module


def _masked_weight(module: nn.Module, name: str) -> torch.Tensor:
    """module.name as its prune mask leaves it (pruned entries 0, whatever `name_orig` holds
    there), detached; the tensor itself when it is not pruned."""
    mask = getattr(module, name + "_mask", None)
    if mask is None:
        return getattr(module, name).detach()
    return getattr(module, name + "_orig").detach().masked_fill(mask == 0, 0)


class NMStructured(BasePruningMethod):
    """N:M structured pruning: in every group of M consecutive entries along dim 1 (in_features
    of a Linear weight, in_channels of a convolution's), keep the N largest |t|, ties pruned
    at the lower index (`dsd_kernels.nm_masks`).

    Composes with torch's methods through PruningContainer: PRUNING_TYPE "global" hands it
    the whole tensor and the mask so far ("unstructured" would hand it the unpruned entries
    flattened, which have no groups). The pattern is computed on the tensor as the earlier
    mask leaves it (its pruned entries count as 0, as torch's iterative pruning ranks only
    what is left), and the earlier mask is kept: every group ends with at most N unpruned
    entries, exactly N where it had N or more non-zero ones.

    Args:
        pattern: "N:M" (e.g. "2:4") or an (n, m) pair, 1 <= N < M <= 64.

    Raises:
        ValueError: a malformed pattern; when a mask is computed, what `nm_masks` refuses
            (dim 1 not a multiple of M, fewer than 2 dims, NaN, an unsupported dtype).
    """

    PRUNING_TYPE = "global"

    def __init__(self, pattern="2:4"):
        self.pattern = _checks.pattern(pattern)

    def compute_mask(self, t, default_mask):
        keep = nm_masks(t.detach().masked_fill(default_mask == 0, 0), self.pattern)
        return default_mask.clone(memory_format=torch.contiguous_format).masked_fill_(~keep, 0)

    @classmethod
    def apply(cls, module, name, pattern="2:4", importance_scores=None):
        """Prune module.name to the pattern, with torch's module state (see
        BasePruningMethod.apply)."""
        return super().apply(module, name, pattern=pattern, importance_scores=importance_scores)


def nm_structured(module: nn.Module, name: str, pattern="2:4", importance_scores=None
                  ) -> nn.Module:
    """Prune module.name to an N:M pattern (see `NMStructured`), as torch's l1_unstructured
    prunes: `name_orig`, `name_mask`, the forward pre-hook; an earlier pruning is kept.

    Args:
        module: the module holding the parameter.
        name: the parameter's name ("weight").
        pattern: "N:M" (e.g. "2:4") or an (n, m) pair, 1 <= N < M <= 64.
        importance_scores: a tensor shaped like the parameter, ranked instead of it.

    Returns:
        The module.

    Raises:
        TypeError: `module` is not an nn.Module.
        ValueError: a malformed pattern; a tensor with fewer than 2 dims or whose dim 1 is
            not a multiple of M; scores of another shape or an unsupported dtype; NaN among
            the unpruned entries. The module is left as it was.
        AttributeError: the module has no parameter `name`.
    """
    n_m = _checks.pattern(pattern)
    _, scores, masks, labels = _scores(
        [(module, name)],
        None if importance_scores is None else {(module, name): importance_scores})
    # Checked before torch's apply, which removes an earlier pruning's hook before it ranks.
    score = scores[0].detach()
    if masks[0] is not None:
        score = score.masked_fill(masks[0] == 0, 0)
    xs, label = _checks.weights([score], labels)
    _checks.nm_shapes(xs, n_m[1], label)
    _checks.no_nan(xs, label)
    NMStructured.apply(module, name, pattern=n_m, importance_scores=importance_scores)
    return module


def _nm_layers(model: nn.Module, pattern, layers=PRUNABLE_LAYERS):
    """The weights of `model`'s `layers` that can take the pattern, and the others.

    Returns:
        ([(qualified name of the weight, module)], {qualified name: why it cannot}).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _, m = _checks.pattern(pattern)
    eligible, dense = [], {}
    for prefix, module in model.named_modules():
        if not isinstance(module, layers):
            continue
        label = f"{prefix}.weight" if prefix else "weight"
        weight = module.weight
        if nm_eligible(weight, pattern):
            eligible.append((label, module))
        else:
            dense[label] = (f"shape {tuple(weight.shape)}: dim 1 ({weight.shape[1]}) is not a "
                            f"multiple of {m}")
    return eligible, dense


def nm_structured_model(model: nn.Module, pattern="2:4", layers=PRUNABLE_LAYERS
                        ) -> dict[str, str]:
    """Prune the weight of every Linear and convolution of `model` (or of `layers`) to an
    N:M pattern, the masks computed in one pass over all of them (`nm_masks`), leaving each
    module as torch's global_unstructured does (a CustomFromMask hook, combined with an
    earlier pruning as `NMStructured` combines). Weights whose dim 1 is not a multiple of M
    are left dense and returned.

    Args:
        model: the model.
        pattern: "N:M" (e.g. "2:4") or an (n, m) pair, 1 <= N < M <= 64.
        layers: the module types whose `weight` is pruned (default `PRUNABLE_LAYERS`).

    Returns:
        {qualified weight name: why it was left dense}.

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: a malformed pattern; a weight of an unsupported dtype or holding NaN
            among its unpruned entries. The model is left as it was.
    """
    n_m = _checks.pattern(pattern)
    eligible, dense = _nm_layers(model, n_m, layers)
    if not eligible:
        return dense
    with torch.no_grad():
        keep = nm_masks([_masked_weight(module, "weight") for _, module in eligible], n_m,
                        names=[label for label, _ in eligible])
    for i, (_, module) in enumerate(eligible):
        mask, keep[i] = keep[i], None  # freed once it is the module's buffer
        custom_from_mask(module, "weight", mask=mask)
        _last_method(module, "weight").mask = module.weight_mask
    return dense


def mask_optimizer_(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Hand the current prune masks of `model` to `optimizer`, made masked in place (any
    torch.optim.Optimizer is converted, see `dsd_kernels.optim.make_masked_`): from now on
    each pruned `name_orig` entry and its optimizer state stay exactly 0 whatever the gradient.

    Call it again after pruning more (or after `remove`, which lifts the masks: the freed
    entries regrow from 0 with 0 state). Pruned tensors the optimizer does not train are
    skipped.

    Args:
        optimizer: a torch.optim.Optimizer (not SparseAdam), or a masked optimizer.
        model: the pruned model.

    Returns:
        The optimizer, masked.

    Raises:
        TypeError: `model` is not an nn.Module, or the optimizer cannot be masked
            (`make_masked_`: SparseAdam).
        ValueError: as `make_masked_` (unsupported dtypes; a class whose fresh state cannot
            be found).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    masks = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod):
                original = getattr(module, hook._tensor_name + "_orig")
                if id(original) in trained:
                    masks[original] = getattr(module, hook._tensor_name + "_mask") != 0
    make_masked_(optimizer).set_masks(masks)
    return optimizer
