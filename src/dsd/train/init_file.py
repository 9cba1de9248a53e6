"""`--init FILE`: the weights a run starts from, read and checked (a plain state_dict, the
entry of a checkpoint dict, a `dsd train` checkpoint, which says which weights it holds, or a
Hugging Face checkpoint: a `save_pretrained` directory or a .safetensors file), and loaded into
a model."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic_io
from .checkpoints import FORMAT, non_finite
from .errors import RunError


@dataclass(frozen=True)
class InitWeights:
    """The state_dict of an --init file and, in words, which weights it is."""

    state: dict
    holds: str


def read_init(path: str) -> InitWeights:
    """The weights in an --init file: a plain state_dict, the entry "state_dict", "model" or
    "model_state_dict" of a checkpoint dict, a `dsd train` checkpoint (one of the DSD arm
    gives its weights, a finished run's last.pt the run's model.pt, and one of the baseline arm
    is refused: its weights are not the DSD run's), or a Hugging Face checkpoint: a
    `save_pretrained` directory (model.safetensors, its sharded index, or pytorch_model.bin)
    or a .safetensors file.

    Args:
        path: the file or directory.

    Raises:
        RunError: the file is unreadable, holds no state_dict, holds NaN or Inf, or is a dsd
            checkpoint whose weights are not the DSD arm's, or the directory holds no Hugging
            Face checkpoint; one line saying which.
    """
    if Path(path).is_dir():
        return _from_pretrained_directory(Path(path))
    if Path(path).suffix == ".safetensors":
        return InitWeights(_checked(_safetensors(Path(path)), path), "a safetensors state_dict")
    try:
        state = atomic_io.load_torch(path)
    except atomic_io.ReadError as error:
        raise RunError(f"init file: {error}") from None
    if isinstance(state, dict) and "format" in state and "arm" in state:
        return _from_dsd_checkpoint(state, Path(path))
    holds = "a state_dict"
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state, holds = state[key], f"the state_dict in its {key!r} entry"
                break
    return InitWeights(_checked(state, path), holds)


def _safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ModuleNotFoundError:
        raise RunError(f"init file {path} is a safetensors file, and reading it needs the "
                       "safetensors package: pip install safetensors") from None
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise RunError(f"init file {path} cannot be read as safetensors: {reason}") from None


def _from_pretrained_directory(path: Path) -> InitWeights:
    """The weights of a `save_pretrained` directory: one safetensors file, the shards its
    index names, or a torch pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        return InitWeights(_checked(_safetensors(path / "model.safetensors"), path),
                           "a Hugging Face checkpoint (model.safetensors)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            raise RunError(f"init file {index} is not a safetensors index (a JSON object "
                           "with a 'weight_map' of parameter names to shard files)") from None
        state = {}
        for shard in shards:
            state.update(_safetensors(path / shard))
        return InitWeights(_checked(state, path), f"a Hugging Face checkpoint ({len(shards)} "
                                                  "safetensors shards)")
    if (path / "pytorch_model.bin").is_file():
        weights = read_init(str(path / "pytorch_model.bin"))
        return InitWeights(weights.state, "a Hugging Face checkpoint (pytorch_model.bin)")
    raise RunError(f"init file {path} is a directory without a Hugging Face checkpoint "
                   "(model.safetensors, model.safetensors.index.json or pytorch_model.bin); "
                   "give a save_pretrained directory or a file")


def _checked(state, path) -> dict:
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise RunError(f"init file {path} holds no state_dict (a dict of parameter names to "
                       "tensors, alone or as the 'state_dict' or 'model' entry of a dict)")
    where = non_finite(state)
    if where is not None:
        raise RunError(f"init file {path} holds NaN or Inf in {where!r}")
    return state


def _from_dsd_checkpoint(state: dict, path: Path) -> InitWeights:
    """The DSD arm's weights in a `dsd train` checkpoint (checkpoints.py), or a RunError that
    says which weights the checkpoint holds and which file to pass instead."""
    if state["format"] != FORMAT:
        raise RunError(f"init file {path} is a dsd checkpoint of format {state['format']!r}; "
                       f"this dsd reads format {FORMAT}: pass the run's model.pt")
    in_run = path.parent.name == "checkpoints"
    run = path.parent.parent if in_run else None
    run_files = f"{run}/model.pt" if in_run else "the run directory's model.pt"
    arm, epoch = state["arm"], state.get("next_epoch")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    total = sum(config.get("phases", ()))
    if arm == "done":  # a finished run's checkpoint keeps no weights: they are in model.pt
        if not (in_run and (run / "model.pt").is_file()):
            raise RunError(f"init file {path} is the checkpoint of a finished run, which keeps "
                           f"no weights: pass {run_files} (the final DSD weights) or "
                           "baseline_model.pt beside it (the dense baseline's)")
        final = read_init(str(run / "model.pt"))
        return InitWeights(final.state, f"the final DSD weights of the finished run {run} "
                                        "(its model.pt)")
    if arm == "baseline":
        resume = f"`dsd train --resume {run}`" if in_run else "`dsd train --resume`"
        raise RunError(f"init file {path} holds the dense baseline arm's weights after epoch "
                       f"{epoch} of {total}, not the DSD arm's (the run stopped in its baseline "
                       f"arm): pass {run_files} for the final DSD weights, or finish the run "
                       f"with {resume} and pass baseline_model.pt for the baseline's")
    if state.get("shards") and state.get("model") is None:  # a --shard run's: slices on disk
        resume = f"`dsd train --resume {run}`" if in_run else "`dsd train --resume`"
        raise RunError(f"init file {path} is a sharded (--shard) checkpoint after epoch "
                       f"{epoch} of {total}: its weights are slices in {state['shards']}/, not "
                       f"one state_dict; finish the run with {resume} and pass {run_files}")
    if arm != "dsd" or not isinstance(state.get("model"), dict):
        raise RunError(f"init file {path} is a damaged dsd checkpoint (arm {arm!r}, no model)")
    return InitWeights(_checked(state["model"], path),
                       f"the DSD arm's weights after epoch {epoch} of {total}"
                       + _phase_words(state, epoch))


def _phase_words(state: dict, epoch: int) -> str:
    """The phase the checkpoint's last epoch trained in, from its sparsity records."""
    records = (state.get("sparsity") or {}).get("dsd") or []
    if not epoch or not records:
        return " (its initial weights)" if not epoch else ""
    record = records[-1]
    if record["kind"] == "sparse":
        return (f" (sparse phase {record['phase'] + 1}: {record['target_sparsity']:.0%} of its "
                "prunable weights zero)")
    return f" (dense phase {record['phase'] + 1})"


def load_init(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load `state` into `model`, or raise naming every key and shape that does not match.

    A parameter the model ties to others (a language model's output layer sharing the input
    embedding) may appear in `state` under any one of its names: safetensors keeps one copy
    of shared tensors, so `save_pretrained` omits the rest.

    Args:
        model: the module to load into; left unchanged on an error.
        state: the state_dict, with tensors on any device and of any floating dtype.
        path: the init file, for the messages.

    Raises:
        RunError: keys missing or unexpected, shapes that differ, or different tensors under
            the names of one tied parameter; one line naming them.
    """
    state = _with_tied_names(model, state, path)
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


def _with_tied_names(model: torch.nn.Module, state: dict, path: str) -> dict:
    """`state` with every name of a tied parameter filled from the one it holds."""
    names = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    state = dict(state)
    for tied in (group for group in names.values() if len(group) > 1):
        held = [name for name in tied if name in state]
        if not held:
            continue  # reported as missing keys
        differing = [name for name in held[1:] if not (
            state[name].shape == state[held[0]].shape and torch.equal(state[name],
                                                                      state[held[0]]))]
        if differing:
            raise RunError(f"init file {path} holds different tensors under {held[0]} and "
                           f"{differing[0]}, which the model ties (one parameter)")
        state.update({name: state[held[0]] for name in tied if name not in state})
    return state


def _listed(items: list[str], most: int = 4) -> str:
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more
