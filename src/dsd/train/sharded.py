"""The checkpoints of `dsd train --shard` (docs/design.md, "Resuming"): each rank writes its
slices of the model and of the optimizer state, the masks included, into one
torch.distributed.checkpoint (DCP) directory, and rank 0 then names that directory in a small
file beside it, written atomically, that holds the rest (config, arm, epoch, phase, every
rank's RNG states, history).

    checkpoints/last.pt           the file: everything but the tensors, and the directory's name
    checkpoints/last-<token>/     the DCP directory it names (branch.pt, branch-<token>/ alike)

A new checkpoint goes to a new directory; only once every rank has written it does rank 0
replace the file, then delete the old directory. A kill at any point leaves the file naming a
whole directory: the old checkpoint or the new one. DCP stores each tensor with its global
shape, so a checkpoint loads on any number of ranks (each reads the slices it now holds). The
masks travel in the optimizer's state, each a DTensor laid out like its parameter
(docs/design.md, "The masked optimizers").
"""

import secrets
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dsd_kernels import local_tensor
from dsd_kernels.optim.masked import SHARDED_MASK

from .. import atomic_io
from ..world import World
from . import checkpoints
from .errors import RunError


def save(arm, next_epoch: int, path: Path, world: World, **records) -> None:
    """Write the checkpoint of a run about to train epoch `next_epoch` of `arm` (None:
    finished) as `path` (checkpoints/last.pt or branch.pt) and its DCP directory. Every rank
    calls it; `records` are checkpoints.capture's config, history, sparsity and seconds."""
    directory = path.parent / f"{path.stem}-{world.from_main(secrets.token_hex(4))}"
    stepped = arm is not None and bool(arm.optimizer.state)
    if arm is not None:
        before = arm.optimizer.state_dict()
        tensors = _tensors(arm)
        if not stepped:  # _tensors gave it a state: the run goes on without
            arm.optimizer.load_state_dict(before)
        with atomic_io.writing(directory):
            try:
                dcp.save(tensors, checkpoint_id=directory)
            except CheckpointException as error:  # every rank's failures, gathered
                first_line = (str(error).strip().splitlines() or [""])[0]
                raise atomic_io.WriteError(f"cannot write {directory}: {first_line}") from None
    rng = world.gather(checkpoints.rng_state())
    if not world.main:
        return
    state = checkpoints.capture(arm, next_epoch, **records)
    state.update(model=None, optimizer=None, rng=rng, world_size=world.size, stepped=stepped,
                 shards=directory.name if arm is not None else None)
    atomic_io.save_torch(state, path)
    for old in path.parent.glob(f"{path.stem}-*"):  # the replaced one, and any a kill left
        if old != directory:
            with atomic_io.writing(old):
                shutil.rmtree(old)


def restore(arm, state: dict, path: Path, world: World) -> None:
    """Load the checkpoint whose file `path` was read as `state` into a freshly built `arm`,
    resharded onto this world, and the RNG states: on the world size it was saved on each rank
    takes its own, on another every rank takes rank 0's.

    Raises:
        RunError: the DCP directory is missing or does not fit the arm, holds NaN or Inf, or a
            weight its mask prunes is not zero; raised on every rank, naming the tensor.
    """
    directory = path.parent / state["shards"]
    tensors, problem = None, None
    try:
        tensors = _tensors(arm)
        dcp.load(tensors, checkpoint_id=directory)
    except Exception as error:  # DCP wraps every rank's failure in its own exception type
        first_line = (str(error).strip().splitlines() or [""])[0]
        problem = f"cannot resume: {directory} does not fit this run ({first_line})"
    problem = world.first_problem(problem)
    if problem is None:
        for part in ("model", "optimizer"):
            where = checkpoints.non_finite(_local(tensors[part]))
            if where is not None:
                problem = f"cannot resume: {directory} holds NaN or Inf in {part} entry {where!r}"
                break
        problem = world.first_problem(problem)
    if problem is not None:
        raise RunError(problem)
    set_model_state_dict(arm.model, tensors["model"])
    optimizer = tensors["optimizer"]
    if not state["stepped"]:  # the state saved was the template _tensors makes: masks alone
        optimizer["state"] = {name: {SHARDED_MASK: entry[SHARDED_MASK]}
                              for name, entry in optimizer["state"].items()}
    # The masks loaded as saved (nothing pruned anew); an entry left with only its mask
    # leaves no state.
    set_optimizer_state_dict(arm.model, arm.optimizer, optimizer)
    checkpoints.check_pruned_zeros(arm, path, world)
    try:
        arm.dsd.load_state_dict({"phase_index": state["phase_index"],
                                 "plan": arm.dsd.plan.to_dict()})
        if arm.scaler:
            arm.scaler.load_state_dict(state["scaler"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise RunError(f"cannot resume: {path} does not fit this run "
                       f"({type(error).__name__}: {error})") from None
    rng = state["rng"]
    checkpoints.set_rng_state(rng[world.rank] if state["world_size"] == world.size else rng[0])


def full_state_dict(model) -> dict:
    """The model's plain state_dict, the whole tensors on CPU, on rank 0 (empty elsewhere);
    every rank calls it (the slices are gathered)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _tensors(arm) -> dict:
    """What the DCP directory holds: the model's and the optimizer's sharded state dicts, the
    latter keyed by parameter name, each parameter's state holding its mask (SHARDED_MASK:
    every parameter is a DTensor under fully_shard, all True while unmasked).

    An optimizer that has not stepped yet gets a state here (get_optimizer_state_dict steps
    it once with zero gradients and lr 0, leaving the weights as they are): DCP saves and
    loads only the tensors it is shown."""
    return {"model": get_model_state_dict(arm.model),
            "optimizer": get_optimizer_state_dict(arm.model, arm.optimizer)}


def _local(state):
    """`state` with every DTensor replaced by its local slice."""
    if isinstance(state, dict):
        return {key: _local(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [_local(value) for value in state]
    return local_tensor(state) if isinstance(state, torch.Tensor) else state
