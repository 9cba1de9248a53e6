"""What a task loader returns (`TaskData`) and the error it raises on bad data (`DataError`)."""

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A data path that is missing or holds the wrong format, or a split that leaves a set
    empty: one line naming it and what to give instead."""


@dataclass(frozen=True)
class TaskData:
    name: str
    kind: str  # "signal" (x (N, L)), "image" (x (N, H, W) or (N, C, H, W)), "text" (int64 (N, T))
    signal_shape: tuple[int, ...]  # one example's shape (x.shape[1:])
    num_classes: int  # text: the vocabulary size
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: bool = False  # training batches get random crop (padding 4) + horizontal flip
    fill: tuple[float, ...] | None = None  # per channel: a black pixel after normalisation
    vocab: str | None = None  # text: the characters, id = index
    source: str = ""  # the resolved path, or "embedded: ..." / "generated"
