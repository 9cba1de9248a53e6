"""DSDCallback under Lightning's DDP on 2 CPU processes (gloo); test_lightning.py runs it.

    python tests/_lightning_ddp.py OUT_DIR

Lightning starts rank 1 by running this script again. Each rank writes OUT_DIR/rank{r}.pt: its
masks at the end of the sparse phase, its initial and final weights.
"""

import sys

import lightning.pytorch as L
import torch

from dsd import Plan
from dsd.integrations.lightning import DSDCallback

from _lightning_net import QUIET, Net, loader


class KeepMasks(L.Callback):
    """The masks by parameter name at the last step of the sparse phase."""

    def __init__(self, dsd_callback):
        self.dsd_callback, self.masks = dsd_callback, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dsd = self.dsd_callback.dsd
        if dsd.phase.kind == "sparse":
            masks = dsd.optimizer.masks
            self.masks = {name: masks[p].clone() for name, p in dsd.named_prunable}


def main(out_dir):
    L.seed_everything(0, verbose=False)
    model = Net("sgd")
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    plan = Plan.dsd(2, 2, 2, sparsity=0.5)
    dsd_callback = DSDCallback(plan)
    keep_masks = KeepMasks(dsd_callback)
    trainer = L.Trainer(**dict(QUIET, devices=2, strategy="ddp"), max_epochs=plan.total,
                        callbacks=[dsd_callback, keep_masks])
    trainer.fit(model, loader())
    torch.save({"world_size": trainer.world_size, "masks": keep_masks.masks, "initial": initial,
                "state_dict": model.state_dict()}, f"{out_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
