"""The checkpoints of `dsd train --shard` (docs/design.md, "Resuming"): each rank writes its
slices of the model, the optimizer state and the masks into one torch.distributed.checkpoint
(DCP) directory, and rank 0 then names that directory in a small file beside it, written
atomically, that holds the rest (config, arm, epoch, phase, every rank's RNG states, history).

    checkpoints/last.pt           the file: everything but the tensors, and the directory's name
    checkpoints/last-<token>/     the DCP directory it names (branch.pt, branch-<token>/ alike)

A new checkpoint goes to a new directory; only once every rank has written it does rank 0
replace the file, then delete the old directory. A kill at any point leaves the file naming a
whole directory: the old checkpoint or the new one. DCP stores each tensor with its global
shape, so a checkpoint loads on any number of ranks (each reads the slices it now holds): the
masks are saved as DTensors shaped like their parameters for that reason.
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
from torch.distributed.tensor import DTensor

from dsd_kernels import local_tensor

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
                 shards=directory.name if arm is not None else None,
                 masked=sorted(_masked_names(arm)) if arm is not None else [])
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
        tensors = _tensors(arm, masked=state["masked"])
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
    set_optimizer_state_dict(arm.model, arm.optimizer, tensors["optimizer"])
    # The masks as the optimizer's state_dict carries them: loaded, nothing pruned anew.
    optimizer = arm.optimizer.state_dict()
    if not state["stepped"]:  # the state saved was only the template _tensors makes
        optimizer["state"] = {}
    index = {name: i for i, (name, _) in enumerate(_named_in_optimizer(arm))}
    optimizer["masks"] = {index[name]: local_tensor(mask)
                          for name, mask in tensors["masks"].items()}
    arm.optimizer.load_state_dict(optimizer)
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


def _tensors(arm, masked=None) -> dict:
    """What the DCP directory holds: the model's and the optimizer's sharded state dicts and
    the masks as bool DTensors shaped like their parameters, keyed by parameter name. For a
    load, `masked` names the parameters whose masks to read (into zero masks).

    An optimizer that has not stepped yet gets a state here (get_optimizer_state_dict steps
    it once with zero gradients and lr 0, leaving the weights as they are): DCP saves and
    loads only the tensors it is shown."""
    model = get_model_state_dict(arm.model)
    optimizer = get_optimizer_state_dict(arm.model, arm.optimizer)
    params = dict(arm.model.named_parameters())
    if masked is None:
        names = {id(p): name for name, p in params.items()}
        masks = {names[id(p)]: _like(p, mask) for p, mask in arm.optimizer.masks.items()}
    else:
        masks = {name: _like(params[name], torch.zeros_like(local_tensor(params[name]),
                                                             dtype=torch.bool))
                 for name in masked}
    return {"model": model, "optimizer": optimizer, "masks": masks}


def _like(p, local: torch.Tensor):
    """`local` (a slice shaped like p's) as a DTensor laid out like the parameter p."""
    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def _named_in_optimizer(arm) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) in the optimizer's order, its state_dict's indices."""
    names = {id(p): name for name, p in arm.model.named_parameters()}
    return [(names[id(p)], p) for group in arm.optimizer.param_groups for p in group["params"]]


def _masked_names(arm) -> list[str]:
    masked = {id(p) for p in arm.optimizer.masks}
    return [name for name, p in arm.model.named_parameters() if id(p) in masked]


def _local(state):
    """`state` with every DTensor replaced by its local slice."""
    if isinstance(state, dict):
        return {key: _local(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [_local(value) for value in state]
    return local_tensor(state) if isinstance(state, torch.Tensor) else state
