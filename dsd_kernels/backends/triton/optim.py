"""Masked SGD and Adam/AdamW: one fused kernel, one pass over memory.

Each element's parameter, gradient, optimizer state and mask are read once and the parameter
and state written once; a pruned position is written as +0.0 in all of them. The optimizer
kind and its structural flags are constexprs; every hyper-parameter (lr, betas, eps, weight
decay, momentum, dampening) and Adam's bias corrections (computed on the host in double, as
torch_ref does) are runtime arguments, so an LR schedule never recompiles. Math is fp32 in the
order torch_ref uses, each multiply and add rounded (compiled without fused multiply-adds), and
the result rounded once on store. Adam counts steps per tensor: tensors at
different counts (rare) are updated by one call per count.

One launch per dtype covers a whole list (see tables.py): a program updates CHUNK elements of
one tensor. The step issues no host synchronisation: grad_scale is read on the device.
Its tables cost host time per tensor, so they are cached: the rows (params, state, masks)
under the key of their addresses and layouts, and the gradients' addresses, which a training
loop may move every step (zero_grad frees them), in a table of their own that is built again
only when an address changed.
"""

import math

import torch
import triton
import triton.language as tl

from ... import host
from . import tables
from .convert import from_fp32, to_fp32
from .tables import blocks_end, column_pointer, lanes

BLOCK = 2048  # elements per step of a program: 8 per thread, 128-bit fp32 accesses
CHUNK = 8 * BLOCK  # elements per program
NUM_WARPS = 8

# Columns of the per-tensor row table (int64): data addresses, then the element count. The
# gradients' addresses are in a table of their own.
_PARAM = tl.constexpr(0)
_STATE1 = tl.constexpr(1)  # SGD: momentum buffer; Adam: exp_avg
_STATE2 = tl.constexpr(2)  # Adam: exp_avg_sq
_MASK = tl.constexpr(3)  # 0 when the tensor has no mask
_NUMEL = tl.constexpr(4)
_COLUMNS = tl.constexpr(5)
_ADDRESSES = 4


@triton.jit
def _masked_optim_kernel(rows_ptr, grads_ptr, chunk_rows_ptr, chunk_starts_ptr, grad_scale_ptr,
                         lr, weight_decay, decay_factor, momentum, one_minus_dampening,
                         one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                         bias_correction2_sqrt,
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
    g_ptr = column_pointer(grads_ptr + tensor, 0, DTYPE, ALIGNED) + start
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

    for offset in range(0, blocks_end(remaining, FULL, CHUNK), BLOCK):
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


_TABLES = tables.Cache()
_ADDRESS, _STRIDES = torch.Tensor.data_ptr, torch.Tensor.stride


class _Tables:
    """A step's tables: the groups' rows and chunks, and the address tables of the gradients
    of the latest call."""

    def __init__(self, device, params, states, masks):
        self.device = device
        self.strides = tuple(map(_STRIDES, params))  # gradients in other layouts are staged

        def row_of(i):
            addresses = [params[i], *(state[i] for state in states)]
            addresses += [None] * (_ADDRESSES - 1 - len(addresses)) + [masks[i]]
            return [0 if t is None else t.data_ptr() for t in addresses] + [params[i].numel()]

        self.groups, _ = tables.grouped(device, params, row_of, _ADDRESSES, CHUNK)
        self._grads = None, None  # description, and per group (address table, aligned)

    def gradients(self, grads, params, staging):
        """Per group, the gradients' address table and whether all the group's addresses are
        aligned; built again only when the gradients moved or changed layout. Gradients in
        another layout than their parameter's are staged (and their tables never kept)."""
        described = host.describe_tensors([grads])
        if described == self._grads[0]:
            return self._grads[1]
        if tuple(map(_STRIDES, grads)) != self.strides:
            grads = [staging.like(g, p, written=False) for g, p in zip(grads, params)]
            described = None
        built, aligned, _ = tables.address_tables(self.device, self.groups,
                                                  tuple(map(_ADDRESS, grads)))
        self._grads = described, [(t, a and group.aligned)
                                  for t, a, group in zip(built, aligned, self.groups)]
        return self._grads[1]


def _step(params, grads, states, masks, grad_scale, hyper, **flags):
    """Launch one kernel per dtype, with tables from the cache where the tensors have not
    moved; tensors in another layout than their parameter's are staged and written back."""
    device = params[0].device
    staging = tables.Staging()
    key = (tables.current_stream(device), host.describe_tensors([params, *states, masks]))
    step_tables = _TABLES.get(key)
    if step_tables is None:
        params = [staging.dense(p, written=True) for p in params]
        states = [[staging.like(s, p, written=True) for s, p in zip(state, params)]
                  for state in states]
        masks = [None if m is None else staging.like(m, p, written=False)
                 for m, p in zip(masks, params)]
        step_tables = _TABLES.add(key, _Tables(device, params, states, masks),
                                  reusable=not staging.staged)

    with tables.on_device(device):
        for group, (grads_table, aligned) in zip(step_tables.groups,
                                                 step_tables.gradients(grads, params, staging)):
            for full, chunk_rows, chunk_starts in group.launches():
                _masked_optim_kernel[(chunk_rows.numel(),)](
                    group.rows, grads_table, chunk_rows, chunk_starts,
                    group.rows if grad_scale is None else grad_scale, **hyper, DTYPE=group.dtype,
                    HAS_GRAD_SCALE=grad_scale is not None, ALIGNED=aligned, FULL=full,
                    CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, **flags,
                    enable_fp_fusion=False)  # docs/design.md, "No fused multiply-adds"
    staging.finish()


def _hyper(lr=0.0, weight_decay=0.0, decay_factor=1.0, momentum=0.0, dampening=0.0, beta1=0.0,
           beta2=0.0, eps=0.0, step_size=0.0, bias_correction2_sqrt=0.0):
    """Runtime scalars of the kernel; differences like 1 - beta1 are taken in double here."""
    return dict(lr=lr, weight_decay=weight_decay, decay_factor=decay_factor, momentum=momentum,
                one_minus_dampening=1 - dampening, one_minus_beta1=1 - beta1, beta2=beta2,
                one_minus_beta2=1 - beta2, eps=eps, step_size=step_size,
                bias_correction2_sqrt=bias_correction2_sqrt)


def masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay,
                nesterov, maximize, grad_scale):
    has_momentum = momentum != 0
    _step(params, grads, [momentum_buffers] if has_momentum else [], masks, grad_scale,
          _hyper(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening),
          ADAM=False, DECOUPLED=False, HAS_MOMENTUM=has_momentum, NESTEROV=nesterov,
          MAXIMIZE=maximize)


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps,
                 weight_decay, decoupled, maximize, grad_scale):
    lists = [params, grads, exp_avgs, exp_avg_sqs, masks]
    for step, chosen in _by_step(steps):
        ps, gs, ms, vs, ks = lists if chosen is None else [[x[i] for i in chosen] for x in lists]
        _step(ps, gs, [ms, vs], ks, grad_scale,
              _hyper(lr=lr, weight_decay=weight_decay, decay_factor=1 - lr * weight_decay,
                     beta1=beta1, beta2=beta2, eps=eps, step_size=lr / (1 - beta1**step),
                     bias_correction2_sqrt=math.sqrt(1 - beta2**step)),
              ADAM=True, DECOUPLED=decoupled, HAS_MOMENTUM=False, NESTEROV=False,
              MAXIMIZE=maximize)


def _by_step(steps):
    """(step count, indices of the tensors at it) per count; indices None when all agree."""
    if len(set(steps)) == 1:
        return [(steps[0], None)]
    chosen = {}
    for i, step in enumerate(steps):
        chosen.setdefault(step, []).append(i)
    return list(chosen.items())
