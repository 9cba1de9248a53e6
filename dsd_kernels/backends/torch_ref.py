"""Pure-torch reference kernels: the fallback on every device and the oracle of the tests.

Written for obvious correctness, not speed: each op is a few whole-tensor torch calls.
Inputs arrive validated by the public API (`dsd_kernels/functional.py`).
"""

import math

import torch

from .._ops import NAN_IS_NO_WEIGHT, magnitude_dtype


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    """|x| as a flat fp32 tensor in logical (row-major) order; exact for fp16/bf16/fp32."""
    return x.detach().reshape(-1).float().abs()


def kth_smallest_abs(xs, k):
    mags = torch.cat([_magnitudes(x) for x in xs])
    return torch.kthvalue(mags, k).values.to(magnitude_dtype(xs))


def kth_smallest_abs_per_tensor(xs, ks):
    values = [torch.kthvalue(_magnitudes(x), k).values for x, k in zip(xs, ks)]
    return torch.stack(values).to(magnitude_dtype(xs))


def magnitude_histogram(xs, rows, prefixes, shift, bits):
    hist = torch.zeros(prefixes.numel(), 1 << bits, dtype=torch.int64, device=prefixes.device)
    for x, row in zip(xs, rows):
        keys = _magnitudes(x).view(torch.int32).long()
        candidates = keys[(keys >> (shift + bits)) == prefixes[row]]
        hist[row] += torch.bincount((candidates >> shift) & ((1 << bits) - 1),
                                    minlength=1 << bits)
    return hist


def _prune_masks(xs, k):
    """Masks that prune the k smallest |x| over all of `xs`, ties by position."""
    if k == 0:
        return [torch.ones(x.shape, dtype=torch.bool, device=x.device) for x in xs]
    mags = [_magnitudes(x) for x in xs]
    threshold = torch.kthvalue(torch.cat(mags), k).values
    ties_to_prune = k - sum((m < threshold).sum() for m in mags)
    masks, ties_before = [], 0
    for x, m in zip(xs, mags):
        tied = m == threshold
        tie_rank = torch.cumsum(tied, 0) + ties_before  # 1-based rank among all tied entries
        pruned = (m < threshold) | (tied & (tie_rank <= ties_to_prune))
        masks.append((~pruned).reshape(x.shape))
        ties_before = ties_before + tied.sum()
    return masks


def magnitude_masks(xs, ks, scope):
    if scope == "layer":
        return [_prune_masks([x], k)[0] for x, k in zip(xs, ks)]
    return _prune_masks(xs, ks[0])


def nm_masks(xs, n, m):
    masks = []
    for i, x in enumerate(xs):
        if torch.isnan(x).any():
            raise ValueError(f"xs[{i}] contains NaN; magnitudes are undefined")
        moved = x.movedim(1, -1)  # the groups' dimension last (docs/design.md, N:M masks)
        keys = _magnitudes(moved).view(torch.int32).long().view(-1, m)
        # Unique ranks: the magnitude, then the position, so a lower index ranks lower.
        ranks = keys * m + torch.arange(m, device=x.device)
        kept = torch.zeros(ranks.shape, dtype=torch.bool, device=x.device)
        kept.scatter_(1, ranks.topk(n, dim=1).indices, True)
        masks.append(kept.view(moved.shape).movedim(-1, 1).contiguous())
    return masks


def nonzero_masks(xs):
    masks = []
    for i, x in enumerate(xs):
        if torch.isnan(x).any():
            raise ValueError(f"xs[{i}] contains NaN; {NAN_IS_NO_WEIGHT}")
        masks.append((x != 0).contiguous())  # -0.0 == 0: both zeros are pruned
    return masks


def fill_pruned_(xs, masks, values):
    for x, mask, value in zip(xs, masks, values):
        x.masked_fill_(~mask, value)


def apply_masks_(xs, masks):
    fill_pruned_(xs, masks, [0.0] * len(xs))


def _unscaled_grad(grad, grad_scale, maximize):
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale.float()
    return -g if maximize else g


def _store(dst, value, mask):
    """dst <- value (fp32, cast to dst's dtype), with +0.0 at pruned positions."""
    if mask is not None:
        value = torch.where(mask, value, 0.0)
    dst.copy_(value)


def masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay,
                nesterov, maximize, grad_scale):
    for i, (p, grad, mask) in enumerate(zip(params, grads, masks)):
        g = _unscaled_grad(grad, grad_scale, maximize)
        p32 = p.float()
        if weight_decay != 0:
            g = g + weight_decay * p32
        if momentum != 0:
            buf = momentum_buffers[i].float() * momentum + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
            _store(momentum_buffers[i], buf, mask)
        _store(p, p32 - lr * g, mask)


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps,
                 weight_decay, decoupled, maximize, grad_scale):
    for p, grad, exp_avg, exp_avg_sq, mask, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, masks, steps
    ):
        g = _unscaled_grad(grad, grad_scale, maximize)
        p32 = p.float()
        if weight_decay != 0:
            if decoupled:
                p32 = p32 * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p32
        m = exp_avg.float().lerp(g, 1 - beta1)
        v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = v.sqrt() / bias_correction2_sqrt + eps
        _store(exp_avg, m, mask)
        _store(exp_avg_sq, v, mask)
        _store(p, p32 - step_size * m / denom, mask)


KERNELS = {
    "kth_smallest_abs": kth_smallest_abs,
    "kth_smallest_abs_per_tensor": kth_smallest_abs_per_tensor,
    "magnitude_histogram": magnitude_histogram,
    "magnitude_masks": magnitude_masks,
    "nm_masks": nm_masks,
    "nonzero_masks": nonzero_masks,
    "apply_masks_": apply_masks_,
    "fill_pruned_": fill_pruned_,
    "masked_sgd_": masked_sgd_,
    "masked_adam_": masked_adam_,
}
