"""Where and in which precision a run computes: the device, autocast, inputs moved there."""

import contextlib

import torch

from ..config import RunConfig
from .errors import RunError

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device `name` ("auto", "cpu", "cuda", ...) stands for on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast(config: RunConfig, device):
    """The autocast context of `config.amp` (none when amp is off)."""
    if config.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[config.amp])


def to_device(x: torch.Tensor, config: RunConfig, device) -> torch.Tensor:
    """A batch of inputs on `device`, channels-last when the run asks for it."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x
