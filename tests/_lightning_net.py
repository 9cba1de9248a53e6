"""The small LightningModule, data and Trainer settings that test_lightning.py and
_lightning_ddp.py share: a 2-layer MLP on 256 synthetic examples, 4 batches an epoch, fixed
order (no shuffle), so two runs from the same seed see the same batches."""

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCHES_PER_EPOCH = 4
PRUNABLE = ("net.0.weight", "net.2.weight")  # what DSD prunes by default in Net
STATE_NAMES = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"),
               "adamw": ("exp_avg", "exp_avg_sq")}
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
             enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3:6].pow(2).sum(1) > 3).long()
    return DataLoader(TensorDataset(x, y), batch_size=256 // BATCHES_PER_EPOCH)


def lr_factor(step: int) -> float:
    """LambdaLR's factor at a step: an absolute schedule, as warmups and cosines are."""
    return 1.0 / (1.0 + 0.1 * step)


class Net(L.LightningModule):
    """`optimizer`: sgd (momentum), sgd0 (no momentum), adam, adamw or lbfgs; `scheduler`:
    "epoch" (StepLR, each epoch) or "step" (LambdaLR, each optimizer step)."""

    def __init__(self, optimizer: str = "sgd", scheduler: str = "epoch"):
        super().__init__()
        self.kind, self.scheduler = optimizer, scheduler
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.optimizer_made = None  # what configure_optimizers returned, for the tests

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        params = self.parameters()
        self.optimizer_made = {
            "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4),
            "sgd0": lambda: torch.optim.SGD(params, lr=0.5),
            "adam": lambda: torch.optim.Adam(params, lr=0.01),
            "adamw": lambda: torch.optim.AdamW(params, lr=0.01),
            "lbfgs": lambda: torch.optim.LBFGS(params, lr=0.01),
        }[self.kind]()
        if self.scheduler == "epoch":
            scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer_made, 1, gamma=0.8)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer_made, lr_factor)
        return {"optimizer": self.optimizer_made,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler}}
