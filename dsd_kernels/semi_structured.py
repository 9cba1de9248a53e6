"""Export of N:M models: check that weights are N:M, and hand a model's Linear weights to
torch's semi-structured (2:4) sparse kernels on CUDA (docs/export.md).

    from dsd_kernels.semi_structured import check_nm, to_semi_structured_
    check_nm(model, "2:4")                     # ValueError naming the first group that is not
    report = to_semi_structured_(model.half().cuda())
    report.converted, report.dense             # names; {name: why it stays dense}
"""

from typing import NamedTuple

import torch
from torch import nn

from . import _checks
from .prune import _masked_weight, _nm_layers

__all__ = ["check_nm", "to_semi_structured_", "SemiStructuredReport", "SEMI_STRUCTURED_DTYPES"]

# The dtypes of nn.Linear weights torch's semi-structured kernels multiply with 2:4 sparsity;
# of these, each backend takes the ones in its _DTYPE_SHAPE_CONSTRAINTS (float32 is 1:2 in
# CUTLASS's layout, float8 has no mm).
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


class SemiStructuredReport(NamedTuple):
    converted: list[str]  # qualified weight names, in model order
    dense: dict[str, str]  # qualified weight name: why it stays dense


def _named_tensors(model_or_named_tensors, pattern) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs to check: a model's N:M-eligible layer weights (as their prune
    masks leave them), or the given pairs, each of which must take the pattern."""
    n, m = pattern
    if isinstance(model_or_named_tensors, nn.Module):
        eligible, _ = _nm_layers(model_or_named_tensors, pattern)
        return [(label, _masked_weight(module, "weight")) for label, module in eligible
                if not _converted(module.weight)]
    items = model_or_named_tensors
    items = list(items.items() if isinstance(items, dict) else items)
    pairs = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError("check_nm takes an nn.Module, a dict {name: tensor} or "
                            f"(name, tensor) pairs, got an item {type(item).__name__}")
        if not isinstance(item[1], torch.Tensor):
            raise TypeError(f"check_nm: {item[0]!s:.80} is a {type(item[1]).__name__}, "
                            "not a tensor")
        name, tensor = str(item[0]), item[1].detach()
        if tensor.dim() < 2 or tensor.shape[1] % m:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}: it cannot be {n}:{m}, "
                             f"which groups along dim 1 in groups of {m}")
        pairs.append((name, tensor))
    return pairs


def _converted(weight: torch.Tensor) -> bool:
    """Already a semi-structured tensor (2:4 by construction)."""
    return isinstance(weight, torch.sparse.SparseSemiStructuredTensor)


def _first_dense_group(name: str, t: torch.Tensor, n: int, m: int) -> str | None:
    """Where `t` first breaks the pattern (a group of m along dim 1 with more than n
    non-zeros, in row-major order of the other dims), or None."""
    groups = t.movedim(1, -1).reshape(*t.shape[:1], *t.shape[2:], t.shape[1] // m, m)
    counts = (groups != 0).sum(-1)
    bad = (counts > n).nonzero()
    if not bad.numel():
        return None
    *index, group = bad[0].tolist()
    start = group * m
    where = [str(index[0]), f"{start}:{start + m}", *map(str, index[1:])]
    rows = (f" (row {index[0]}, columns {start} to {start + m - 1})" if t.dim() == 2 else "")
    return (f"{name} is not {n}:{m}: the group {name}[{', '.join(where)}]{rows} has "
            f"{int(counts[tuple(bad[0])])} non-zeros, more than {n}")


def check_nm(model_or_named_tensors, pattern="2:4") -> list[str]:
    """Check that every group of M consecutive entries along dim 1 has at most N non-zeros.

    Args:
        model_or_named_tensors: a model (the weights of its Linear and convolution layers
            whose dim 1 is a multiple of M, as `prune.nm_structured_model` prunes them; a
            pruned layer's weight as its mask leaves it; weights already semi-structured
            are 2:4 and skipped), a dict {name: tensor} or
            (name, tensor) pairs (each must have 2+ dims and dim 1 a multiple of M).
        pattern: "N:M" (e.g. "2:4") or an (n, m) pair, 1 <= N < M <= 64.

    Returns:
        The names checked.

    Raises:
        ValueError: one line naming the first tensor and its first group that is not N:M
            (NaN counts as non-zero); a given tensor that cannot take the pattern; a
            malformed pattern.
        TypeError: not a model, a dict or pairs.
    """
    n, m = _checks.pattern(pattern)
    pairs = _named_tensors(model_or_named_tensors, (n, m))
    for name, tensor in pairs:
        problem = _first_dense_group(name, tensor, n, m)
        if problem:
            raise ValueError(problem)
    return [name for name, _ in pairs]


def _fits_two_four(n: int, m: int) -> bool:
    """Whether every N:M tensor is also 2:4 (at most 2 non-zeros in each aligned group of 4)."""
    if m % 4 == 0:
        return n <= 2
    return 4 % m == 0 and n * (4 // m) <= 2


def _backend():
    """The SparseSemiStructuredTensor subclass `to_sparse_semi_structured` builds."""
    sparse = torch.sparse
    return (sparse.SparseSemiStructuredTensorCUTLASS
            if sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
            else sparse.SparseSemiStructuredTensorCUSPARSELT)


def _why_dense(weight: torch.Tensor, backend) -> list[str]:
    """Why torch's semi-structured kernels cannot take this Linear weight: one line per
    constraint it breaks (device, dtype, shape), none if it can be converted."""
    reasons = []
    if weight.device.type != "cuda":
        reasons.append(f"on {weight.device}: torch's semi-structured kernels run on CUDA only")
    constraints = backend._DTYPE_SHAPE_CONSTRAINTS
    dtypes = [d for d in SEMI_STRUCTURED_DTYPES if d in constraints]
    if weight.dtype not in dtypes:
        reasons.append(f"dtype {weight.dtype}: {backend.BACKEND} takes "
                       f"{', '.join(str(d) for d in dtypes)} (e.g. model.half())")
    # The shape rule of the dtype it would be converted in, float16's if it is none of them.
    limits = constraints[weight.dtype if weight.dtype in dtypes else torch.float16]
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    out_features, in_features = weight.shape
    if out_features < rows or out_features % rows or in_features < cols or in_features % cols:
        reasons.append(f"shape {tuple(weight.shape)}: {backend.BACKEND} needs out_features a "
                       f"positive multiple of {rows} and in_features one of {cols}")
    return reasons


def _check_device(weights: list[torch.Tensor], backend) -> None:
    """The CUDA device and library the kernels need, for the weights to convert."""
    devices = {w.device for w in weights}
    for device in devices:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"{device} has compute capability {major}.{minor}; torch's "
                             "semi-structured kernels need 8.0 or later (Ampere, Hopper)")
    if backend.BACKEND == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise ValueError("this torch build has no cuSPARSELt; set torch.sparse."
                         "SparseSemiStructuredTensor._FORCE_CUTLASS = True to use CUTLASS")


def to_semi_structured_(model: nn.Module, pattern="2:4") -> SemiStructuredReport:
    """Replace the weight of every eligible nn.Linear of `model` with
    `torch.sparse.to_sparse_semi_structured(weight)`, in place, for inference.

    Every check runs before any change: each Linear weight is eligible when it is on CUDA,
    of a dtype the backend takes (float16, bfloat16, int8; `SEMI_STRUCTURED_DTYPES`) and of a
    shape it takes (rows and columns multiples of its minimums); the others stay dense and
    are reported. The eligible ones must then pass `check_nm(..., pattern)`. Weights already
semi-structured (an earlier call's) are left as they are and not reported.

    Args:
        model: the model, pruned to an N:M pattern that is also 2:4 (2:4, 1:4, 1:2, 2:8,
            ...), its torch.nn.utils.prune reparametrisation removed.
        pattern: the pattern the weights are checked against.

    Returns:
        SemiStructuredReport(converted=[names], dense={name: why}).

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: a pattern that does not imply 2:4; a Linear still reparametrised by
            torch.nn.utils.prune (call prune.remove first); a device without the kernels
            (compute capability below 8.0, no cuSPARSELt); an eligible weight that is not
            N:M (as `check_nm`). The model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n, m = _checks.pattern(pattern)
    if not _fits_two_four(n, m):
        raise ValueError(f"pattern {n}:{m} does not imply 2:4, the only pattern of torch's "
                         "semi-structured kernels; use 2:4, 1:4, 1:2 or 2:8")
    backend = _backend()
    targets, dense = [], {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        label = f"{prefix}.weight" if prefix else "weight"
        if _converted(module.weight):
            continue
        if hasattr(module, "weight_orig"):
            raise ValueError(f"{label} is reparametrised by torch.nn.utils.prune; call "
                             f"prune.remove(model.{prefix or '<module>'}, 'weight') first "
                             "(the pruned entries stay 0)")
        why = _why_dense(module.weight, backend)
        if why:
            dense[label] = "; ".join(why)
        else:
            targets.append((label, module))
    if targets:
        _check_device([module.weight for _, module in targets], backend)
        check_nm([(label, module.weight) for label, module in targets], (n, m))
    with torch.no_grad():
        # Every conversion before the first assignment: a failing one leaves the model as it was.
        sparse = [torch.sparse.to_sparse_semi_structured(module.weight.detach().contiguous())
                  for _, module in targets]
    for (_, module), weight in zip(targets, sparse):
        module.weight = nn.Parameter(weight, requires_grad=False)
    return SemiStructuredReport([label for label, _ in targets], dense)
