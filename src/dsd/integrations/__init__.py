"""DSD inside the trainers people already use, as callbacks:

    from dsd.integrations.lightning import DSDCallback      # pip install 'dsd[lightning]'
    from dsd.integrations.transformers import DSDCallback   # pip install 'dsd[transformers]'

Each module imports its framework when it is imported itself; `import dsd` imports neither.
"""

import importlib

from ..runner import DSD


def require(extra: str, *modules: str):
    """The first of `modules` (a framework's import names) that imports; if none does, a
    one-line error naming the extra to install."""
    for module in modules:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not (module + ".").startswith(error.name + "."):
                raise  # the framework is there but something it imports is not
            continue
    names = " or ".join(module.split(".")[0] for module in modules)
    raise ImportError(f"dsd.integrations.{extra} needs {names}, which is not installed; "
                      f"install it with: pip install 'dsd[{extra}]'")


def phase_metrics(dsd: DSD) -> dict[str, float]:
    """What a callback logs when a phase starts: its index, LR scale and sparsity per layer."""
    metrics = {"dsd/phase": float(dsd.phase_index), "dsd/lr_scale": dsd.phase.lr_scale}
    metrics.update({f"dsd/sparsity/{name}": value for name, value in dsd.sparsity().items()})
    return metrics
