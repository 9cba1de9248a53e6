"""dsd: Dense-Sparse-Dense training for PyTorch, on the sparse core `dsd_kernels`.

    from dsd import DSD, Plan
    dsd = DSD(model, optimizer, Plan.dsd(10, 10, 10, sparsity=0.5))  # optimizer now masked
    for epoch in range(dsd.plan.total):
        dsd.epoch_start(epoch)
        ...  # your batches
"""

from .plan import Phase, Plan
from .runner import DSD, prunable_parameters

__version__ = "0.1.0"
__all__ = ["DSD", "Plan", "Phase", "prunable_parameters"]
