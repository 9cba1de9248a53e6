"""Dense-Sparse-Dense by hand with dsd_kernels alone, on a small synthetic task.

Dense: train. Sparse: prune half of each weight matrix by magnitude and retrain under the
fixed mask (the masked optimizer keeps pruned weights and their momentum at exactly 0).
Re-dense: lift the mask and retrain at a tenth of the learning rate.

    python examples/dsd_by_hand.py
"""

import torch
from torch import nn

import dsd_kernels as dk


def data(n, generator):
    x = torch.randn(n, 20, generator=generator)
    y = ((x[:, :5].sum(1) > 0).long() + (x[:, 5:10].pow(2).sum(1) > 5).long())
    return x, y


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main():
    gen = torch.Generator().manual_seed(0)
    (x, y), (x_test, y_test) = data(4096, gen), data(2048, gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 3))
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    opt = dk.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)

    for phase, epochs in (("dense", 10), ("sparse", 10), ("re-dense", 10)):
        if phase == "sparse":
            masks = dk.magnitude_masks(list(weights.values()), 0.5, names=list(weights))
            opt.set_masks(dict(zip(weights.values(), masks)))
        if phase == "re-dense":
            opt.clear_masks()
            for group in opt.param_groups:
                group["lr"] *= 0.1
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(128):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        zeros = ", ".join(f"{name} {(p == 0).float().mean():.0%}" for name, p in weights.items())
        print(f"{phase:>8}: {epochs} epochs, test accuracy {accuracy(model, x_test, y_test):.3f}, "
              f"zero weights: {zeros}")
    print(f"backends: {dk.selected_backends()}")


if __name__ == "__main__":
    main()
