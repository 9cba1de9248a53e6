"""Objects the user names as "package.module:attribute" (`--model`, `--optimizer`): imported
with the current directory importable, so `dsd train --model mynets:build` finds mynets.py
beside the user; every failure is a one-line ValueError naming the spec."""

import importlib
import os
import sys


def is_spec(name: str) -> bool:
    """Whether a name is a "package.module:attribute" spec rather than a built-in name."""
    return ":" in name


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def import_spec(spec: str, what: str, form: str, example: str):
    """The object a "package.module:attribute" spec names (the attribute may be nested:
    "module:Class.build").

    Args:
        spec: the spec.
        what: what the spec is, for the messages ("model factory").
        form, example: how to write one, for the message of a malformed spec
            ("'package.module:callable'", "'torchvision.models:resnet18'").

    Raises:
        ValueError: the spec is malformed, its module does not import, or it has no such
            attribute; one line naming the spec.
    """
    module_name, _, attributes = spec.partition(":")
    path = attributes.split(".")
    if not all(part.isidentifier() for part in module_name.split(".") + path):
        raise ValueError(f"{what} {spec!r} is malformed; write it as {form}, e.g. {example}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module failing in any way is a bad spec
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r}: "
                         f"{first_line(error)}") from error
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    found, owner = module, f"module {module_name!r}"
    for index, part in enumerate(path):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"{what} {spec!r}: {owner} has no attribute {part!r}") from None
        owner = f"{module_name}:{'.'.join(path[:index + 1])}"
    return found
