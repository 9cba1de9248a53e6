"""Everything a run needs that can be wrong (data, model, optimizer, --init file), checked
before any file is written."""

import torch

from ..config import RunConfig
from ..data import alter_training, load_task
from ..models import is_factory
from ..runner import prunable_parameters, zeros_found
from .arms import Arm, model_label
from .compute import autocast
from .errors import RunError
from .init_file import read_init


def prepare(config: RunConfig, device) -> tuple:
    """Load the task, read the --init file and build the run's initial model, checking each.

    Args:
        config: the run's options.
        device: the torch.device the model is built on.

    Returns:
        (data, init, model): the task's splits, the --init file's weights (an InitWeights:
        the state_dict and which weights it is; None without --init) and the DSD arm's
        initial model, already run once on two validation examples.

    Raises:
        RunError: the task, the --init file or the model does not fit the run (the message
            names which and why; with masks zeros, a model without exact zeros in its
            prunable tensors); so do the task's own DataError and the model's errors.
        ConfigError: the optimizer refuses its arguments or cannot be masked.
    """
    data = load_task(config.task, data=config.data or None, val_fraction=config.val_fraction,
                     mnist1d_samples=config.mnist1d_samples, seq_len=config.seq_len)
    data = alter_training(data, examples=config.train_examples, label_noise=config.label_noise,
                          seed=config.seed)
    if config.channels_last and not (data.kind == "image" and len(data.signal_shape) == 3):
        raise RunError(f"channels_last needs (C, H, W) image inputs; task {config.task} has "
                       f"{data.kind} inputs of shape {tuple(data.signal_shape)}")
    init = read_init(config.init) if config.init else None
    # Include/exclude patterns, the init file's keys and the model's output get checked here.
    model = Arm.build(config, data, "dsd", device, init=init and init.state).model
    _check_output(model, data, device, config)
    if config.masks == "zeros":  # refused here, before the run directory, as DSD would
        plan = config.plan()
        try:
            zeros_found(prunable_parameters(model, plan.include, plan.exclude))
        except ValueError as error:
            raise RunError(f"--masks zeros: {config.init}: {error}") from None
    return data, init, model


def _check_output(model, data, device, config: RunConfig) -> None:
    """Two validation examples through the model: its output must hold one score per class
    (per character for text), or the run would fail at its first batch."""
    x = data.x_val[:2].to(device)
    expected = (len(x), *data.y_val.shape[1:], data.num_classes)
    try:
        with torch.no_grad(), autocast(config, device):
            model.eval()
            out = model(x)
    except Exception as error:  # the user's model on our inputs: any failure is theirs to fix
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise RunError(f"model {model_label(config, data)} fails on task {config.task}'s inputs "
                       f"(a batch of shape {tuple(x.shape)}): {type(error).__name__}: "
                       f"{first_line}") from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != expected:
        hint = " (give model_args such as num_classes)" if is_factory(config.model) else ""
        raise RunError(f"model {model_label(config, data)} gives output {shape} for a batch of "
                       f"shape {tuple(x.shape)}; task {config.task} needs {expected} "
                       f"({data.num_classes} classes){hint}")
