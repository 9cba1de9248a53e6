"""The checkpoint format of `dsd train` (checkpoints/last.pt, checkpoints/branch.pt): what one
holds, reading one back checked, restoring an arm from it, and the RNG states it carries
(docs/design.md, "Resuming"). Under --shard the tensors live in a DCP directory beside the
file (sharded.py)."""

import random
from pathlib import Path

import numpy as np
import torch

from dsd_kernels import local_tensor

from .. import atomic_io
from ..config import RunConfig
from .errors import RunError

FORMAT = 2  # checkpoint layout version
KEYS = ("format", "config", "arm", "next_epoch", "model", "optimizer", "phase_index", "scaler",
        "rng", "history", "sparsity", "seconds")


def capture(arm, next_epoch: int, *, config: RunConfig, history: dict, sparsity: dict,
            seconds: float) -> dict:
    """The checkpoint of a run about to train epoch `next_epoch` of `arm` (None: finished)."""
    return {"format": FORMAT, "config": config.to_dict(),
            "arm": arm.name if arm else "done", "next_epoch": next_epoch,
            "model": arm.model.state_dict() if arm else None,
            "optimizer": arm.optimizer.state_dict() if arm else None,
            "phase_index": arm.dsd.phase_index if arm else None,
            "scaler": arm.scaler.state_dict() if arm and arm.scaler else None,
            "rng": rng_state(), "history": history, "sparsity": sparsity,
            "seconds": seconds}


def read(path: Path, config: RunConfig, arm_names: list[str]) -> dict:
    """The checkpoint at `path`, checked to be this run's and finite before anything uses it;
    otherwise a RunError naming the file and the fault, with nothing modified."""
    try:
        state = atomic_io.load_torch(path)
    except atomic_io.ReadError as error:
        raise RunError(f"cannot resume: {error}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise RunError(f"cannot resume: {path} is not a dsd checkpoint")
    if state["format"] != FORMAT:
        raise RunError(f"cannot resume: {path} has checkpoint format {state['format']!r}; "
                       f"this dsd reads format {FORMAT}")
    saved = state.get("config")
    if isinstance(saved, dict):  # checkpoints from before these options lack their keys
        saved = {"pattern": "", "masks": "magnitude", "shard": False, **saved}
    if saved != config.to_dict():
        if isinstance(saved, dict) and saved | {"shard": config.shard} == config.to_dict():
            flag = "--shard" if saved["shard"] else "--no-shard"
            raise RunError(f"cannot resume: {path} was written by a run with {flag}; resume "
                           f"it with {flag}")
        raise RunError(f"cannot resume: {path} belongs to another config")
    missing = sorted(set(KEYS) - set(state))
    if missing or state["arm"] not in (*arm_names, "done"):
        raise RunError(f"cannot resume: {path} is a damaged dsd checkpoint "
                       f"({'no ' + ', '.join(missing) if missing else 'unknown arm'})")
    if state.get("shards") and not (path.parent / state["shards"]).is_dir():
        raise RunError(f"cannot resume: {path.parent / state['shards']}, the sharded tensors "
                       f"of {path}, is missing")
    for part in ("model", "optimizer"):
        where = non_finite(state[part])
        if where is not None:
            raise RunError(f"cannot resume: {path} holds NaN or Inf in {part} entry {where!r}")
    return state


def restore(arm, state: dict, path: Path) -> None:
    """Load a checkpoint read from `path` into a freshly built `arm`, and the RNG states.

    Raises:
        RunError: the checkpoint does not fit the arm, or a weight its mask prunes is not
            zero (check_pruned_zeros).
    """
    try:
        arm.model.load_state_dict(state["model"])
        arm.optimizer.load_state_dict(state["optimizer"])  # state, LRs and masks
        # The arms' phases agree up to the branch, so a phase index carries across.
        arm.dsd.load_state_dict({"phase_index": state["phase_index"],
                                 "plan": arm.dsd.plan.to_dict()})
        if arm.scaler:
            arm.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise RunError(f"cannot resume: {path} does not fit this run "
                       f"({type(error).__name__}: {first_line})") from None
    check_pruned_zeros(arm, path)


def check_pruned_zeros(arm, path: Path, world=None) -> None:
    """Refuse a restored checkpoint in which a weight that its mask prunes is not zero (the
    weights or the masks were edited since the checkpoint was written): training would keep
    that weight frozen at its value instead of at 0. Under a sharded `world` every rank
    raises, naming the first tensor any rank found."""
    names = {id(p): name for name, p in arm.model.named_parameters()}
    problem = next((f"cannot resume: {path} holds non-zero weights that the mask of "
                    f"{names[id(p)]} prunes: its weights or its masks were changed after it "
                    "was saved" for p, mask in arm.optimizer.masks.items()
                    if local_tensor(p.detach())[~mask].any()), None)
    if world is not None:
        problem = world.first_problem(problem)
    if problem is not None:
        raise RunError(problem)


def non_finite(state) -> str | None:
    """The key path of the first floating tensor in `state` holding NaN or Inf, if any."""
    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(state.isfinite().all())
        return None if finite else ""
    items = state.items() if isinstance(state, dict) else \
        enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        where = non_finite(value)
        if where is not None:
            return f"{key}.{where}" if where else str(key)
    return None


def rng_state() -> dict:
    """The torch, Python, numpy and CUDA RNG states, as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
