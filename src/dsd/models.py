"""The embedded models. Plain nn.Modules: a DSD run's final state_dict loads into them as is.

    model = build_model("mlp", signal_shape=(40,), num_classes=10)
    model.load_state_dict(torch.load("runs/.../dsd_model.pt"))
"""

import math

import torch
from torch import nn

MODELS = ("mlp", "cnn", "gru", "lstm")


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
    """Stride-2 3-wide convolutions with ReLU (1-D for signals, 2-D for images), then a
    linear classifier on the flattened features."""

    def __init__(self, signal_shape, num_classes: int, channels=(32, 32), dropout=0.0):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(signal_shape)]
        widths = [1, *channels]
        self.convs = nn.ModuleList(conv(a, b, kernel_size=3, stride=2, padding=1)
                                   for a, b in zip(widths, widths[1:]))
        size = list(signal_shape)
        for _ in channels:
            size = [(s + 1) // 2 for s in size]  # length after a stride-2, pad-1, 3-wide conv
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels[-1] * math.prod(size), num_classes)

    def forward(self, x):
        x = x.unsqueeze(1)  # one input channel
        for layer in self.convs:
            x = torch.relu(layer(x))
        return self.out(self.dropout(x.flatten(1)))


class RNNClassifier(nn.Module):
    """A GRU or LSTM over the signal (one value per step) or the image (one row per step);
    the last step's hidden state goes to a linear classifier."""

    def __init__(self, cell: str, input_size: int, num_classes: int, hidden: int = 64,
                 dropout=0.0):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(input_size, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(-1)  # (batch, length) -> (batch, length, 1 feature)
        steps, _ = self.rnn(x)
        return self.out(self.dropout(steps[:, -1]))


def build_model(name: str, signal_shape, num_classes: int, *, mlp_hidden=(300, 100),
                cnn_channels=(32, 32), rnn_hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name == "mlp":
        return MLP(math.prod(signal_shape), num_classes, tuple(mlp_hidden), dropout)
    if name == "cnn":
        return CNN(tuple(signal_shape), num_classes, tuple(cnn_channels), dropout)
    input_size = 1 if len(signal_shape) == 1 else signal_shape[-1]
    return RNNClassifier(name, input_size, num_classes, rnn_hidden, dropout)
