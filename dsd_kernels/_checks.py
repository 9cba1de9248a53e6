"""Input validation shared by every public op: checked once here, before any backend runs,
so a bad call raises a ValueError naming the tensor and leaves every tensor untouched."""

import math
import numbers
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCOPES = ("layer", "global")
MAX_GROUP = 64  # the largest M of an N:M pattern


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


class Names:
    """How a list argument's entries are called in error messages: `xs[2]`, or a given name."""

    def __init__(self, what: str, names=None):
        self.what, self.names = what, names

    def __call__(self, i: int) -> str:
        if self.names is not None:
            return f"{self.what}[{i}] ({self.names[i]!r})"
        return f"{self.what}[{i}]"


def tensor_list(xs, what: str, *, allow_none: bool = False) -> list:
    """A non-empty list of tensors (or None entries, if allowed) from a tensor or a sequence."""
    if isinstance(xs, torch.Tensor):
        return [xs]
    if not isinstance(xs, (list, tuple)):
        raise ValueError(f"{what} must be a tensor or a list of tensors, not {type(xs).__name__}")
    if not xs:
        raise ValueError(f"{what} is an empty list")
    for i, x in enumerate(xs):
        if not (isinstance(x, torch.Tensor) or (allow_none and x is None)):
            raise ValueError(f"{what}[{i}] must be a tensor, not {type(x).__name__}")
    return list(xs)


def names_for(names, xs: list, what: str) -> Names:
    if names is not None and len(names) != len(xs):
        raise ValueError(f"names has {len(names)} entries but {what} has {len(xs)}")
    return Names(what, names)


def weights(xs, names) -> tuple[list, Names]:
    """The tensors whose magnitudes are ranked: a non-empty list of dense float tensors on one
    device, with the labels error messages use."""
    xs = tensor_list(xs, "xs")
    label = names_for(names, xs, "xs")
    float_tensors(xs, label)
    return xs, label


def same_length(items: list, what: str, ref: list, ref_what: str) -> None:
    if len(items) != len(ref):
        raise ValueError(f"{what} has {len(items)} entries but {ref_what} has {len(ref)}")


def float_tensors(xs: list, label: Names) -> None:
    """Dense fp32/fp16/bf16 tensors, all on the device of the first."""
    device = xs[0].device
    for i, x in enumerate(xs):
        if x.layout != torch.strided:
            raise ValueError(f"{label(i)} is a {x.layout} tensor; only dense tensors are supported")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{label(i)} has dtype {x.dtype}; supported: float32, float16, "
                             "bfloat16")
        if x.device != device:
            raise ValueError(f"{label(i)} is on {x.device} but {label(0)} is on {device}; "
                             "one call takes tensors on one device")


def _extremes(xs: list) -> torch.Tensor:
    """Each tensor's (min, max), one row per tensor: NaN where it holds a NaN (aminmax
    propagates it), infinite where it holds an Inf and no NaN."""
    extremes = [e for x in xs for e in (torch.aminmax(x) if x.numel() else (x.new_zeros(()),) * 2)]
    return torch.stack(extremes).view(-1, 2)


def non_finite(xs: list) -> torch.Tensor:
    """One bool per tensor: does it hold a NaN or Inf? (On the tensors' device, no sync.)

    A tensor's min and max are NaN or infinite exactly when one of its entries is; aminmax
    finds them in one read without a temporary (on CPU over 10x faster than isfinite().all()).
    One aminmax per tensor and three ops for the whole list: per-tensor ops cost more than
    the reads on lists of many small tensors.
    """
    return ~torch.isfinite(_extremes(xs)).all(1)


def finite(xs: list, label: Names) -> None:
    """No NaN or Inf anywhere (one device sync for the whole list). Meta tensors (one device
    for the whole list) hold no values: nothing to check, as torch's own checks skip them."""
    if xs[0].device.type == "meta":
        return
    bad = non_finite(xs).nonzero()
    if bad.numel():
        raise ValueError(f"{label(int(bad[0]))} contains NaN or Inf; magnitudes are undefined")


def no_nan(xs: list, label: Names, why: str = "magnitudes are undefined") -> None:
    """No NaN anywhere (Inf allowed; one device sync for the whole list; meta tensors hold
    no values); `why` ends the message."""
    if xs[0].device.type == "meta":
        return
    bad = torch.isnan(_extremes(xs)).any(1).nonzero()
    if bad.numel():
        raise ValueError(f"{label(int(bad[0]))} contains NaN; {why}")


def pattern(value) -> tuple[int, int]:
    """An N:M pattern, from "N:M" or an (n, m) pair of ints: 1 <= n < m <= MAX_GROUP."""
    n = m = None
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts):
            n, m = int(parts[0]), int(parts[1])
    elif (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        n, m = int(value[0]), int(value[1])
    if n is None or not 1 <= n < m <= MAX_GROUP:
        raise ValueError(f"pattern must be 'N:M' or an (n, m) pair with 1 <= n < m <= "
                         f"{MAX_GROUP}, got {value!r}")
    return n, m


def nm_eligible(x: torch.Tensor, m: int) -> bool:
    """Can `x` take an N:M pattern: 2+ dims, its dim-1 size (the reduction dim) a multiple
    of m."""
    return x.dim() >= 2 and x.shape[1] % m == 0


def nm_shapes(xs: list, m: int, label: Names) -> None:
    """Every tensor can take an N:M pattern with groups of m (see nm_eligible)."""
    for i, x in enumerate(xs):
        if x.dim() < 2:
            raise ValueError(f"{label(i)} has shape {_shape(x)}; N:M patterns need 2+ dims "
                             "(they group along dim 1)")
        if x.shape[1] % m:
            raise ValueError(f"{label(i)} has shape {_shape(x)}; its dim 1 ({x.shape[1]}) is "
                             f"not a multiple of M={m}")


def like(t: torch.Tensor, ref: torch.Tensor, what: str, ref_what: str) -> None:
    """Same shape, dtype and device as `ref` (a gradient or an optimizer state tensor)."""
    if t.layout != torch.strided:
        raise ValueError(f"{what} is a {t.layout} tensor; only dense tensors are supported")
    if t.shape != ref.shape:
        raise ValueError(f"{what} has shape {_shape(t)} but {ref_what} has shape {_shape(ref)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{what} has dtype {t.dtype} but {ref_what} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{what} is on {t.device} but {ref_what} is on {ref.device}")


def mask_for(mask: torch.Tensor, ref: torch.Tensor, what: str, ref_what: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{what} must be a bool tensor (True = kept), not {kind}")
    if mask.shape != ref.shape:
        raise ValueError(f"{what} has shape {_shape(mask)} but {ref_what} has shape {_shape(ref)}")
    if mask.device != ref.device:
        raise ValueError(f"{what} is on {mask.device} but {ref_what} is on {ref.device}")


def rank(k, total: int) -> int:
    """A k-th smallest over `total` elements: an int in [1, total]."""
    k = integer(k, "k")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of elements), got {k}")
    return k


def ranks(ks, numels: list, label: Names) -> list:
    """One k per tensor, each in [1, that tensor's numel]."""
    if len(ks) != len(numels):
        raise ValueError(f"k has {len(ks)} entries but xs has {len(numels)}; give one per tensor")
    checked = [integer(k, f"k[{i}]") for i, k in enumerate(ks)]
    for i, (k, numel) in enumerate(zip(checked, numels)):
        if not 1 <= k <= numel:
            raise ValueError(f"k[{i}] must be in [1, {numel}] (the elements of {label(i)}), "
                             f"got {k}")
    return checked


def pruned(value, totals: list, scope: str, label: Names) -> list:
    """Explicit counts to prune: one int per tensor for scope "layer" (`totals` their numels),
    one int for "global" (`totals` the one total), each in [0, its total]."""
    if scope == "layer":
        if not isinstance(value, (list, tuple)):
            raise ValueError("pruned must be a list of one int per tensor for scope='layer', "
                             f"not {type(value).__name__}")
        if len(value) != len(totals):
            raise ValueError(f"pruned has {len(value)} entries but xs has {len(totals)}; give "
                             "one per tensor")
        counts = [integer(k, f"pruned[{i}]") for i, k in enumerate(value)]
        for i, (k, total) in enumerate(zip(counts, totals)):
            if not 0 <= k <= total:
                raise ValueError(f"pruned[{i}] must be in [0, {total}] (the elements of "
                                 f"{label(i)}), got {k}")
        return counts
    k = integer(value, "pruned")
    if not 0 <= k <= totals[0]:
        raise ValueError(f"pruned must be in [0, {totals[0]}] (the elements of xs), got {k}")
    return [k]


def integer(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {type(value).__name__}") from None


def real(value, what: str, low: float | None = None, high: float | None = None,
         *, high_open: bool = False) -> float:
    """A finite real number in [low, high] (or [low, high) with high_open)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"{what} must be a real number, not {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number or a one-element tensor")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{what} must be {bound}, got {value}")
    return value


def fill_value(value, dtype: torch.dtype, what: str, tensor: str) -> float:
    """A real number to write into a tensor of `dtype`: any, Inf and NaN included, except a
    finite one beyond the dtype's largest magnitude (which torch's fill refuses too)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"{what} must be a real number, not {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{what} must be a real number or a one-element real tensor")
        value = value.item()
    value = float(value)
    if math.isfinite(value) and abs(value) > torch.finfo(dtype).max:
        raise ValueError(f"{what} = {value} overflows {dtype}, the dtype of {tensor}")
    return value


def sparsity(value) -> float:
    """A sparsity to prune to: a real number in [0, 1) (NaN fails every comparison)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    accepted = (not isinstance(value, bool) and isinstance(value, numbers.Real)
                and 0.0 <= value < 1.0)
    if not accepted:
        raise ValueError(f"sparsity must be a number in [0, 1), got {value!r}")
    return float(value)


def scope(value) -> str:
    if value not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {value!r}")
    return value


def grad_scale(value, device: torch.device):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise ValueError("grad_scale must be a one-element floating-point tensor or None")
    if value.device != device:
        raise ValueError(f"grad_scale is on {value.device} but params are on {device}")
    return value.reshape(())
