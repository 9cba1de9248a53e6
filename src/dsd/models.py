"""The embedded models. Plain nn.Modules: a DSD run's final state_dict loads into them as is.

    model = build_model("mlp", signal_shape=(40,), num_classes=10)
    model.load_state_dict(torch.load("runs/.../dsd_model.pt"))

`signal_shape` is the shape of one example. The data kinds:
signal: x float (N, L) 1-D signals; image: x float (N, H, W) grayscale or (N, C, H, W);
text: x int64 (N, T) character ids, targets int64 (N, T) (the next character), and
num_classes is the vocabulary size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .imports import first_line, import_spec, is_spec

MODELS = ("auto", "mlp", "cnn", "gru", "lstm", "resnet20", "resnet32", "resnet56", "vgg16")
DATA_KINDS = ("signal", "image", "text")

_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M")
# What each model needs, for the message when it does not fit.
_NEEDS = {
    "mlp": "1-D signals or images",
    "cnn": "1-D signals or images",
    "gru": "1-D signals, (H, W) images or text",
    "lstm": "1-D signals, (H, W) images or text",
    **{name: "(C, H, W) images of at least 8x8" for name in _RESNET_DEPTHS},
    "vgg16": "(C, H, W) images whose height and width are multiples of 32",
}


class MLP(nn.Module):
    """LeNet-300-100: fully connected in -> 300 -> 100 -> classes with ReLU."""

    def __init__(self, in_features: int, num_classes: int, hidden=(300, 100), dropout=0.0):
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.dropout(torch.relu(layer(x)))
        return self.out(x)


class CNN(nn.Module):
    """Stride-2 3-wide convolutions with ReLU (1-D for (L,) signals, 2-D for (H, W) or
    (C, H, W) images), then a linear classifier on the flattened features."""

    def __init__(self, signal_shape, num_classes: int, channels=(32, 32), dropout=0.0):
        super().__init__()
        self.add_channel = len(signal_shape) < 3  # (L,) and (H, W) inputs have no channel axis
        if self.add_channel:
            in_channels, size = 1, list(signal_shape)
        else:
            in_channels, size = signal_shape[0], list(signal_shape[1:])
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(size)]
        widths = [in_channels, *channels]
        self.convs = nn.ModuleList(conv(a, b, kernel_size=3, stride=2, padding=1)
                                   for a, b in zip(widths, widths[1:]))
        for _ in channels:
            size = [(s + 1) // 2 for s in size]  # length after a stride-2, pad-1, 3-wide conv
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels[-1] * math.prod(size), num_classes)

    def forward(self, x):
        if self.add_channel:
            x = x.unsqueeze(1)
        for layer in self.convs:
            x = torch.relu(layer(x))
        return self.out(self.dropout(x.flatten(1)))


def _rnn(cell: str, input_size: int, hidden: int, layers: int, dropout: float) -> nn.RNNBase:
    # nn.GRU/LSTM apply dropout only between layers and warn when there is a single layer.
    rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
    return rnn(input_size, hidden, num_layers=layers, batch_first=True,
               dropout=dropout if layers > 1 else 0.0)


class RNNClassifier(nn.Module):
    """A GRU or LSTM over the signal (one value per step) or the image (one row per step);
    the last step's hidden state goes to a linear classifier."""

    def __init__(self, cell: str, input_size: int, num_classes: int, hidden: int = 64,
                 layers: int = 1, dropout=0.0):
        super().__init__()
        self.rnn = _rnn(cell, input_size, hidden, layers, dropout)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(-1)  # (batch, length) -> (batch, length, 1 feature)
        steps, _ = self.rnn(x)
        return self.out(self.dropout(steps[:, -1]))


class CharLM(nn.Module):
    """Character language model: embedding -> GRU/LSTM -> linear decoder, giving the logits
    of the next character at every step: (B, T) int64 -> (B, T, vocab_size)."""

    def __init__(self, cell: str, vocab_size: int, hidden: int, layers: int = 1, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.rnn = _rnn(cell, hidden, hidden, layers, dropout)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x):
        steps, _ = self.rnn(self.embed(x))
        return self.out(self.dropout(steps))


def _kaiming_convs(model: nn.Module):
    # He et al. 2015's initialisation, the usual choice for ReLU convolutional networks.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an option-A shortcut: the input subsampled by
    the stride and zero-padded to the extra channels, so the shortcut has no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return torch.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. 2016 (sec. 4.2): a 3x3 stem, three stages of
    n = (depth - 2) / 6 basic blocks (the second and third start with stride 2), global average
    pooling and a linear classifier. Depths 20, 32, 56 have 0.27M, 0.46M, 0.85M parameters."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, widths=(16, 32, 64)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth {depth} is not 6n+2; use e.g. 20, 32, 44 or 56")
        blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            stage = []
            for block in range(blocks):
                stage.append(_BasicBlock(channels, width, 2 if index and not block else 1))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Linear(channels, num_classes)
        _kaiming_convs(self)

    def forward(self, x):
        x = self.stages(torch.relu(self.bn(self.stem(x))))
        return self.out(x.mean((2, 3)))


class VGG(nn.Module):
    """VGG-16 with batch norm after every convolution, the common CIFAR variant: after the five
    poolings a 32x32 input is 512x1x1 (larger inputs are averaged down to it), then dropout and
    a single linear classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, dropout=0.0):
        super().__init__()
        layers, channels = [], in_channels
        for width in _VGG16:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels, num_classes)
        _kaiming_convs(self)

    def forward(self, x):
        return self.out(self.dropout(self.pool(self.features(x)).flatten(1)))


def _checked_shape(kind: str, signal_shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in signal_shape)
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose one of {', '.join(DATA_KINDS)}")
    if len(shape) not in {"signal": (1,), "image": (2, 3), "text": (1,)}[kind]:
        raise ValueError(f"per-example shape {shape} does not fit {kind} data; signals are (L,), "
                         f"images (H, W) or (C, H, W), text (T,)")
    return shape


def _fits(name: str, kind: str, shape: tuple[int, ...]) -> bool:
    if name in ("mlp", "cnn"):
        return kind in ("signal", "image")
    if name in ("gru", "lstm"):
        return kind != "image" or len(shape) == 2
    if kind != "image" or len(shape) != 3:
        return False
    height, width = shape[1:]
    if name == "vgg16":
        return height % 32 == 0 and width % 32 == 0 and min(height, width) >= 32
    return min(height, width) >= 8


def _describe(kind: str, shape: tuple[int, ...]) -> str:
    if kind == "signal":
        return f"1-D signals of length {shape[0]}"
    if kind == "text":
        return f"text in sequences of {shape[0]} characters"
    if len(shape) == 2:
        return f"{shape[0]}x{shape[1]} grayscale images"
    return f"{shape[0]}-channel {shape[1]}x{shape[2]} images"


def models_for(kind: str, signal_shape) -> tuple[str, ...]:
    """The built-in model names (not "auto") that fit inputs of this kind and per-example shape."""
    shape = _checked_shape(kind, signal_shape)
    return tuple(name for name in MODELS[1:] if _fits(name, kind, shape))


def default_model(kind: str, signal_shape) -> str:
    """What "auto" means: text -> "lstm", (C, H, W) images -> "resnet20", otherwise "mlp"
    (also for (C, H, W) images smaller than the 8x8 resnet20 needs)."""
    shape = _checked_shape(kind, signal_shape)
    if kind == "text":
        return "lstm"
    return "resnet20" if _fits("resnet20", kind, shape) else "mlp"


def build_model(name: str, signal_shape, num_classes: int, *, kind: str | None = None,
                mlp_hidden=(300, 100), cnn_channels=(32, 32), rnn_hidden: int = 64,
                rnn_layers: int = 1, dropout: float = 0.0) -> nn.Module:
    """A built-in model for examples of `signal_shape`; `kind` None means "signal" for 1-D
    shapes and "image" otherwise. For text, num_classes is the vocabulary size."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if kind is None:
        kind = "signal" if len(signal_shape) == 1 else "image"
    shape = _checked_shape(kind, signal_shape)
    if name == "auto":
        name = default_model(kind, shape)
    if not _fits(name, kind, shape):
        raise ValueError(f"model {name!r} does not fit {_describe(kind, shape)}; for this task "
                         f"choose one of {', '.join(models_for(kind, shape))} "
                         f"({name} needs {_NEEDS[name]})")
    if name == "mlp":
        return MLP(math.prod(shape), num_classes, tuple(mlp_hidden), dropout)
    if name == "cnn":
        return CNN(shape, num_classes, tuple(cnn_channels), dropout)
    if name in _RESNET_DEPTHS:
        return CifarResNet(_RESNET_DEPTHS[name], num_classes, in_channels=shape[0])
    if name == "vgg16":
        return VGG(num_classes, in_channels=shape[0], dropout=dropout)
    if kind == "text":
        return CharLM(name, num_classes, rnn_hidden, rnn_layers, dropout)
    input_size = 1 if kind == "signal" else shape[-1]
    return RNNClassifier(name, input_size, num_classes, rnn_hidden, rnn_layers, dropout)


def is_factory(name: str) -> bool:
    """Whether a model name is a "module.path:callable" factory spec rather than a built-in."""
    return is_spec(name)


def model_from_factory(spec: str, kwargs: dict | None = None) -> nn.Module:
    """The nn.Module that `callable(**kwargs)` returns for a "package.module:callable" spec
    (the callable may be nested: "module:Class.build"). The current directory is importable,
    so `dsd train --model mynets:build` finds mynets.py beside the user."""
    factory = import_spec(spec, "model factory", "'package.module:callable'",
                          "'torchvision.models:resnet18'")
    kwargs = {} if kwargs is None else kwargs
    if not callable(factory):
        raise ValueError(f"model factory {spec!r}: {spec} is {type(factory).__name__}, "
                         f"not callable")
    try:
        model = factory(**kwargs)
    except Exception as error:
        raise ValueError(f"model factory {spec}(**{kwargs!r}) failed: "
                         f"{first_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec} returned {type(model).__name__}, "
                         f"not a torch.nn.Module")
    return model
