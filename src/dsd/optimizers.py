"""The optimizer of a `dsd train` run by name: one of torch.optim's (case-insensitive, e.g.
sgd, rmsprop, nadam) or a "package.module:Class" spec (e.g. lion_pytorch:Lion), and which of
the run's options its constructor gets. The run makes it masked in place
(`dsd_kernels.optim.make_masked_`)."""

import inspect

import torch

from .imports import first_line, import_spec, is_spec

# torch.optim's optimizer classes by lower-case name (the base class Optimizer is none).
TORCH_OPTIMIZERS = {
    name.lower(): cls for name in torch.optim.__all__
    if isinstance(cls := getattr(torch.optim, name), type)
    and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}


def class_name(cls: type) -> str:
    """torch.optim.NAME for torch.optim's classes, else the class's module and name."""
    if TORCH_OPTIMIZERS.get(cls.__name__.lower()) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical_name(name: str) -> str:
    """A torch.optim name in lower case; a spec as it is.

    Raises:
        ValueError: neither a torch.optim optimizer name nor a spec; the message starts
            after the option's name (": unknown ...").
    """
    if is_spec(name):
        return name
    if name.lower() not in TORCH_OPTIMIZERS:
        raise ValueError(f": unknown optimizer {name!r}; choose one of "
                         f"{', '.join(sorted(TORCH_OPTIMIZERS))} (any case), or give "
                         "MODULE:CLASS, e.g. lion_pytorch:Lion")
    return name.lower()


def optimizer_class(name: str) -> type:
    """The class a canonical optimizer name stands for, importing a spec's module.

    Raises:
        ValueError: the spec is malformed or does not import, or names no torch.optim.Optimizer
            class; the message starts after the option's name (" 'mod:Cls': ...").
    """
    if not is_spec(name):
        return TORCH_OPTIMIZERS[name]
    try:
        found = import_spec(name, "optimizer", "'package.module:Class'", "'lion_pytorch:Lion'")
    except ValueError as error:
        raise ValueError(str(error).removeprefix("optimizer")) from None
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        what = f"class {found.__qualname__}" if isinstance(found, type) else \
            type(found).__name__
        raise ValueError(f" {name!r}: {what} is not a torch.optim.Optimizer subclass")
    return found


def run_kwargs(cls: type, *, lr: float, momentum: float, weight_decay: float) -> dict:
    """The run's options that `cls` gets: lr always, momentum for SGD and its subclasses,
    weight_decay where the constructor takes it.

    Raises:
        ValueError: a weight decay other than 0 for a constructor without weight_decay.
    """
    kwargs = {"lr": lr}
    if issubclass(cls, torch.optim.SGD):
        kwargs["momentum"] = momentum
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = weight_decay
    elif weight_decay:
        raise ValueError(f"{class_name(cls)} takes no weight_decay")
    return kwargs


def construct(cls: type, params, kwargs: dict) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)`.

    Raises:
        ValueError: the constructor refused; one line naming the call and its error.
    """
    try:
        return cls(params, **kwargs)
    except Exception as error:  # the class's own checks, in any form, are a bad argument
        shown = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        raise ValueError(f"{cls.__qualname__}({shown}) failed: {first_line(error)}") from error
