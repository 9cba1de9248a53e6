"""`--init FILE`: the state_dict a run starts from, read and checked, and loaded into a model."""

import torch

from .. import atomic_io
from .checkpoints import non_finite
from .errors import RunError


def read_init(path: str) -> dict:
    """The state_dict in an --init file: a plain one, or the entry "state_dict", "model" or
    "model_state_dict" of a checkpoint dict (a dsd checkpoint's is "model")."""
    try:
        state = atomic_io.load_torch(path)
    except atomic_io.ReadError as error:
        raise RunError(f"init file: {error}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise RunError(f"init file {path} holds no state_dict (a dict of parameter names to "
                       "tensors, alone or as the 'state_dict' or 'model' entry of a dict)")
    where = non_finite(state)
    if where is not None:
        raise RunError(f"init file {path} holds NaN or Inf in {where!r}")
    return state


def load_init(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load `state` into `model`, or raise naming every key and shape that does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} is {tuple(state[k].shape)} there, {tuple(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} {_listed(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
    if shapes:
        problems.append(f"shapes differ: {_listed(shapes)}")
    if problems:
        raise RunError(f"init file {path} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


def _listed(items: list[str], most: int = 4) -> str:
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more
