"""DSD inside the trainers people already use, as callbacks:

    from dsd.integrations.lightning import DSDCallback      # pip install 'dsd[lightning]'
    from dsd.integrations.transformers import DSDCallback   # pip install 'dsd[transformers]'

Each module imports its framework when it is imported itself; `import dsd` imports neither.
"""

import importlib

from ..runner import DSD


def require(extra: str, module: str):
    """Import `module` (a framework); if it is missing, a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"dsd.integrations.{extra} needs {module.split('.')[0]}, which is not "
                          f"installed ({error}); install it with: pip install 'dsd[{extra}]'"
                          ) from None


def phase_metrics(dsd: DSD) -> dict[str, float]:
    """What a callback logs when a phase starts: its index, LR scale and sparsity per layer."""
    metrics = {"dsd/phase": float(dsd.phase_index), "dsd/lr_scale": dsd.phase.lr_scale}
    metrics.update({f"dsd/sparsity/{name}": value for name, value in dsd.sparsity().items()})
    return metrics
