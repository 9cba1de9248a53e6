"""Masked SGD and Adam/AdamW: one fused kernel, one pass over memory.

Each element's parameter, gradient, optimizer state and mask are read once and the parameter
and state written once; a pruned position is written as +0.0 in all of them. The optimizer
kind and its structural flags are constexprs; every hyper-parameter (lr, betas, eps, weight
decay, momentum, dampening) is a runtime argument, so an LR schedule never recompiles. Math is
fp32 in the order torch_ref uses, rounded once on store. Per-tensor Adam bias corrections
differ with each tensor's step and are computed on the host in double, as torch_ref does.

One launch per dtype covers a whole list (see tables.py): a program updates CHUNK elements of
one tensor. The step issues no host synchronisation: grad_scale is read on the device.
"""

import math

import torch
import triton
import triton.language as tl

from . import tables
from .tables import column_pointer, lanes
from .convert import from_fp32, to_fp32

BLOCK = 2048  # elements per step of a program: 8 per thread, 128-bit fp32 accesses
CHUNK = 8 * BLOCK  # elements per program
NUM_WARPS = 8

# Columns of the per-tensor row table (int64): data addresses, then the element count.
_PARAM = tl.constexpr(0)
_GRAD = tl.constexpr(1)
_STATE1 = tl.constexpr(2)  # SGD: momentum buffer; Adam: exp_avg
_STATE2 = tl.constexpr(3)  # Adam: exp_avg_sq
_MASK = tl.constexpr(4)  # 0 when the tensor has no mask
_NUMEL = tl.constexpr(5)
# Adam's per-tensor bias corrections, fp32 values stored as their bit patterns.
_STEP_SIZE = tl.constexpr(6)  # lr / (1 - beta1**step)
_BIAS_CORRECTION2_SQRT = tl.constexpr(7)  # sqrt(1 - beta2**step)
_COLUMNS = tl.constexpr(8)
_ADDRESSES = 5


@triton.jit
def _fp32_column(row, column):
    return tl.load(row + column).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _masked_optim_kernel(rows_ptr, chunk_rows_ptr, chunk_starts_ptr, grad_scale_ptr,
                         lr, weight_decay, decay_factor, momentum, one_minus_dampening,
                         one_minus_beta1, beta2, one_minus_beta2, eps,
                         DTYPE: tl.constexpr, ADAM: tl.constexpr, DECOUPLED: tl.constexpr,
                         HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                         MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                         ALIGNED: tl.constexpr, FULL: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):
    """One masked SGD (ADAM=False) or Adam/AdamW (ADAM=True) step on one chunk of a tensor."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_rows_ptr + chunk).to(tl.int64)
    row = rows_ptr + tensor * _COLUMNS
    start = tl.multiple_of(tl.load(chunk_starts_ptr + chunk), CHUNK)  # chunks start aligned
    remaining = tl.load(row + _NUMEL) - start
    p_ptr = column_pointer(row, _PARAM, DTYPE, ALIGNED) + start
    g_ptr = column_pointer(row, _GRAD, DTYPE, ALIGNED) + start
    state1_ptr = column_pointer(row, _STATE1, DTYPE, ALIGNED) + start
    state2_ptr = column_pointer(row, _STATE2, DTYPE, ALIGNED) + start
    # Mask bytes are promised 4-byte alignment only: 4 per thread, like the fp32 data, so the
    # compiler keeps one layout for all and moves no values through shared memory.
    mask_ptr = column_pointer(row, _MASK, tl.int8, ALIGNED, 4) + start
    # No mask: no element of it is read, and every position is kept. A scalar condition keeps
    # the load's mask uniform across a thread's lanes, so mask bytes load as vectors too.
    has_mask = tl.load(row + _MASK) != 0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    if ADAM:
        step_size = _fp32_column(row, _STEP_SIZE)
        bias_correction2_sqrt = _fp32_column(row, _BIAS_CORRECTION2_SQRT)

    for offset in range(0, CHUNK, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        inside = lanes(index, remaining, FULL, BLOCK)
        keep = tl.load(mask_ptr + index, mask=tl.where(has_mask, inside, False), other=1) != 0
        g = to_fp32(tl.load(g_ptr + index, mask=inside, other=0.0))
        p = to_fp32(tl.load(p_ptr + index, mask=inside, other=0.0))
        if HAS_GRAD_SCALE:
            g = tl.div_rn(g, grad_scale)
        if MAXIMIZE:
            g = -g
        if weight_decay != 0:
            if DECOUPLED:
                p = p * decay_factor
            else:
                g = g + weight_decay * p
        if ADAM:
            m = to_fp32(tl.load(state1_ptr + index, mask=inside, other=0.0))
            v = to_fp32(tl.load(state2_ptr + index, mask=inside, other=0.0))
            # torch.lerp(m, g, 1 - beta1), with torch's two formulas for small and large weights
            if one_minus_beta1 < 0.5:
                m = m + one_minus_beta1 * (g - m)
            else:
                m = g - (g - m) * (1.0 - one_minus_beta1)
            v = v * beta2 + one_minus_beta2 * g * g
            denominator = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
            p = p - tl.div_rn(step_size * m, denominator)
            tl.store(state1_ptr + index, from_fp32(tl.where(keep, m, 0.0), DTYPE), mask=inside)
            tl.store(state2_ptr + index, from_fp32(tl.where(keep, v, 0.0), DTYPE), mask=inside)
        else:
            if HAS_MOMENTUM:
                buf = to_fp32(tl.load(state1_ptr + index, mask=inside, other=0.0))
                buf = buf * momentum + one_minus_dampening * g
                if NESTEROV:
                    g = g + momentum * buf
                else:
                    g = buf
                tl.store(state1_ptr + index, from_fp32(tl.where(keep, buf, 0.0), DTYPE),
                         mask=inside)
            p = p - lr * g
        tl.store(p_ptr + index, from_fp32(tl.where(keep, p, 0.0), DTYPE), mask=inside)


def _step(params, grads, states, masks, corrections, grad_scale, hyper, **flags):
    """Stage every tensor in its parameter's layout, launch one kernel per dtype, write back."""
    device = params[0].device
    staging = tables.Staging()
    params = [staging.dense(p, written=True) for p in params]
    grads = [staging.like(g, p, written=False) for g, p in zip(grads, params)]
    states = [[staging.like(s, p, written=True) for s, p in zip(state, params)]
              for state in states]
    masks = [None if m is None else staging.like(m, p, written=False)
             for m, p in zip(masks, params)]

    # fp32 rounding of the host's doubles, as torch does with a Python scalar
    correction_bits = torch.tensor(corrections, dtype=torch.float32).view(torch.int32).tolist()

    def row_of(i):
        addresses = [params[i], grads[i], *(state[i] for state in states)]
        addresses += [None] * (_ADDRESSES - 1 - len(addresses)) + [masks[i]]
        return ([0 if t is None else t.data_ptr() for t in addresses] + [params[i].numel()]
                + correction_bits[i])

    groups, _ = tables.grouped(device, params, row_of, _ADDRESSES, CHUNK)
    with tables.on_device(device):
        for group in groups:
            for full, chunk_rows, chunk_starts in group.launches():
                _masked_optim_kernel[(chunk_rows.numel(),)](
                    group.rows, chunk_rows, chunk_starts,
                    group.rows if grad_scale is None else grad_scale, **hyper, DTYPE=group.dtype,
                    HAS_GRAD_SCALE=grad_scale is not None, ALIGNED=group.aligned, FULL=full,
                    CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, **flags)
    staging.finish()


def _hyper(lr=0.0, weight_decay=0.0, decay_factor=1.0, momentum=0.0, dampening=0.0, beta1=0.0,
           beta2=0.0, eps=0.0):
    """Runtime scalars of the kernel; differences like 1 - beta1 are taken in double here."""
    return dict(lr=lr, weight_decay=weight_decay, decay_factor=decay_factor, momentum=momentum,
                one_minus_dampening=1 - dampening, one_minus_beta1=1 - beta1, beta2=beta2,
                one_minus_beta2=1 - beta2, eps=eps)


def masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay,
                nesterov, maximize, grad_scale):
    has_momentum = momentum != 0
    no_corrections = [(0.0, 0.0)] * len(params)
    _step(params, grads, [momentum_buffers] if has_momentum else [], masks, no_corrections,
          grad_scale,
          _hyper(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening),
          ADAM=False, DECOUPLED=False, HAS_MOMENTUM=has_momentum, NESTEROV=nesterov,
          MAXIMIZE=maximize)


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps,
                 weight_decay, decoupled, maximize, grad_scale):
    corrections = [(lr / (1 - beta1**step), math.sqrt(1 - beta2**step)) for step in steps]
    _step(params, grads, [exp_avgs, exp_avg_sqs], masks, corrections, grad_scale,
          _hyper(lr=lr, weight_decay=weight_decay, decay_factor=1 - lr * weight_decay,
                 beta1=beta1, beta2=beta2, eps=eps),
          ADAM=True, DECOUPLED=decoupled, HAS_MOMENTUM=False, NESTEROV=False, MAXIMIZE=maximize)
