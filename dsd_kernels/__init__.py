"""dsd_kernels: the sparse core of dsd. Exact magnitude thresholds and masks, and masked
optimizer updates that keep pruned weights and their optimizer state exactly zero.

The functions live in `dsd_kernels.functional`, the masked optimizers in `dsd_kernels.optim`,
the torch.nn.utils.prune drop-in in `dsd_kernels.prune`; this module re-exports them.
"""

from . import optim
from .backends import (
                       BACKEND_CHOICES,
                       BACKENDS,
                       BackendUnavailable,
                       available_backends,
                       backend_from_env,
                       selected_backends,
                       use_backend,
)
from .distributed import local_tensor
from .functional import (
                       SCOPES,
                       apply_masks_,
                       check_sparsity,
                       fill_pruned_,
                       kth_smallest_abs,
                       magnitude_masks,
                       masked_adam_,
                       masked_sgd_,
                       nm_eligible,
                       nm_masks,
                       nonzero_masks,
                       pruned_count,
)
from .optim import MaskedAdam, MaskedAdamW, MaskedSGD

__all__ = [
    "kth_smallest_abs", "magnitude_masks", "nm_masks", "nm_eligible", "nonzero_masks",
    "apply_masks_",
    "fill_pruned_", "masked_sgd_", "masked_adam_",
    "pruned_count", "check_sparsity", "SCOPES", "local_tensor",
    "available_backends", "use_backend", "selected_backends", "backend_from_env",
    "BACKENDS", "BACKEND_CHOICES", "BackendUnavailable",
    "optim", "MaskedSGD", "MaskedAdam", "MaskedAdamW",
]
