"""Assembling an arm of a run (the DSD arm, or its dense baseline): the model, its masked
optimizer, the DSD runner and (fp16) the gradient scaler."""

import torch

from dsd_kernels.optim import make_masked_

from ..config import ConfigError, RunConfig
from ..models import build_model, default_model, is_factory, model_from_factory
from ..optimizers import construct, optimizer_class, run_kwargs
from ..runner import DSD
from ..world import World
from .init_file import load_init


def model_label(config: RunConfig, data) -> str:
    """The model's name: the built-in one ("auto" resolved for the task) or the factory spec."""
    if is_factory(config.model):
        return config.model
    if config.model == "auto":
        return default_model(data.kind, data.signal_shape)
    return config.model


def optimizer_call(config: RunConfig) -> tuple[type, dict]:
    """The run's optimizer class and its constructor's keyword arguments (beside params)."""
    cls = optimizer_class(config.optimizer)
    return cls, run_kwargs(cls, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay) | config.optimizer_args


def masked_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    """The run's optimizer on `params`, made masked in place (SGD, Adam and AdamW become
    their fused masked classes).

    Raises:
        ConfigError: the constructor refuses the arguments (optimizer_args, or optimizer when
            there are none), or make_masked_ refuses the optimizer (optimizer).
    """
    cls, kwargs = optimizer_call(config)
    try:
        optimizer = construct(cls, params, kwargs)
    except ValueError as error:
        raise ConfigError("optimizer_args" if config.optimizer_args else "optimizer",
                          f": {error}") from None
    try:
        return make_masked_(optimizer)
    except (TypeError, ValueError) as error:
        raise ConfigError("optimizer", f" {config.optimizer}: {error}") from None


class Arm:
    """One arm's live objects: the model, its masked optimizer, the DSD runner and (fp16) the
    gradient scaler; `net` is the module that runs the batches (the model itself, its DDP
    wrapper under torchrun, or the model made FSDP2 in place under --shard)."""

    def __init__(self, name, model, dsd, net, scaler):
        self.name, self.model, self.dsd, self.net, self.scaler = name, model, dsd, net, scaler

    @classmethod
    def build(cls, config: RunConfig, data, name: str, device, world: World | None = None,
              init: dict | None = None) -> "Arm":
        """Arm `name` ("dsd" or "baseline") at its start; `init` is the --init state_dict."""
        torch.manual_seed(config.seed)  # the same initial weights for both arms and devices
        if is_factory(config.model):
            model = model_from_factory(config.model, config.model_args)
        else:
            model = build_model(config.model, data.signal_shape, data.num_classes,
                                kind=data.kind, mlp_hidden=config.mlp_hidden,
                                cnn_channels=config.cnn_channels, rnn_hidden=config.rnn_hidden,
                                rnn_layers=config.rnn_layers, dropout=config.dropout)
        if init is not None:
            load_init(model, init, config.init)
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # Wrapped first: fully_shard replaces the parameters, which the optimizer must hold.
        net = world.wrap(model, device) if world else model
        optimizer = masked_optimizer(config, model.parameters())
        plan = config.plan()
        dsd = DSD(model, optimizer, plan if name == "dsd" else plan.dense_baseline())
        scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        return cls(name, model, dsd, net, scaler)

    @property
    def optimizer(self):
        return self.dsd.optimizer
