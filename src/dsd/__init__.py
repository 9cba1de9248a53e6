"""dsd: Dense-Sparse-Dense training for PyTorch, on the sparse core `dsd_kernels`."""

__version__ = "0.1.0"
