"""Triton kernels: exact thresholds and masks, and fused masked optimizer steps.

Registered for CUDA tensors; with TRITON_INTERPRET=1 also for CPU tensors, which Triton's
interpreter runs (slowly, but it exercises every kernel without a GPU). Each op is one module
(threshold.py, mask.py, nm.py, zeros.py, optim.py); tables.py holds the multi-tensor launch
tables they share.
"""

import os

import torch

from .. import Backend, BackendUnavailable


def load() -> Backend:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable(f"triton cannot be imported ({error})") from None
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpreted):
        raise BackendUnavailable("no CUDA device, and TRITON_INTERPRET=1 is not set")
    from . import mask, nm, optim, threshold, zeros

    kernels = {
        "kth_smallest_abs": threshold.kth_smallest_abs,
        "kth_smallest_abs_per_tensor": threshold.kth_smallest_abs_per_tensor,
        "magnitude_histogram": threshold.magnitude_histogram,
        "magnitude_masks": mask.magnitude_masks,
        "nm_masks": nm.nm_masks,
        "nonzero_masks": zeros.nonzero_masks,
        "apply_masks_": mask.apply_masks_,
        "fill_pruned_": mask.fill_pruned_,
        "masked_sgd_": optim.masked_sgd_,
        "masked_adam_": optim.masked_adam_,
    }
    return Backend(kernels, ("CUDA",) + (("CPU",) if interpreted else ()))
