"""Dense-Sparse-Dense inside PyTorch Lightning with `DSDCallback`, on scikit-learn's 8x8 digits
(shipped with scikit-learn: no download).

The LightningModule is ordinary: configure_optimizers returns SGD with momentum and a cosine
LR schedule. The callback makes the optimizer masked when fitting starts, prunes half of each
weight matrix at the sparse phase, lifts the mask at re-dense and scales the scheduler's LR
by 0.1 there. Needs `pip install 'dsd[lightning]'`.

    python examples/lightning_dsd.py
"""

import logging
import warnings

import lightning.pytorch as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dsd import Plan
from dsd.integrations.lightning import DSDCallback


def loaders():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[test], y[test]), batch_size=len(test)))


class DigitsMLP(L.LightningModule):
    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, 10))
        self.accuracy = []  # test accuracy after each epoch

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if not self.trainer.sanity_checking:
            self.accuracy.append((self.net(x).argmax(1) == y).float().mean().item())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs,
                                                               eta_min=0.02)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class PhaseReport(L.Callback):
    """Prints each phase's last test accuracy and its sparsity, from the DSD at work."""

    def __init__(self, dsd_callback: DSDCallback):
        self.dsd_callback = dsd_callback

    def on_validation_epoch_end(self, trainer, pl_module):
        dsd = self.dsd_callback.dsd
        ends = [start + phase.length for start, phase in zip(dsd.plan.starts, dsd.plan.phases)]
        if trainer.sanity_checking or trainer.current_epoch + 1 not in ends:
            return
        phase = dsd.phase
        name = "re-dense" if phase.kind == "dense" and dsd.phase_index > 0 else phase.kind
        sparsity = ", ".join(f"{layer} {value:.0%}" for layer, value in dsd.sparsity().items())
        lr = trainer.optimizers[0].param_groups[0]["lr"] * phase.lr_scale  # what the step uses
        print(f"{name:>8}, {phase.length} epochs: test accuracy {pl_module.accuracy[-1]:.3f}, "
              f"last LR {lr:.3g}, zero weights: {sparsity}")


def main():
    warnings.filterwarnings("ignore", ".*(does not have many workers|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(0, verbose=False)
    plan = Plan.dsd(8, 8, 8, sparsity=0.5, redense_lr_factor=0.1)
    dsd_callback = DSDCallback(plan)
    trainer = L.Trainer(max_epochs=plan.total, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[dsd_callback,
                                                               PhaseReport(dsd_callback)])
    train, test = loaders()
    trainer.fit(DigitsMLP(plan.total), train, test)


if __name__ == "__main__":
    main()
