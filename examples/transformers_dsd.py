"""DSD inside the Hugging Face Trainer: a tiny ViT, built from a config (no download), on
scikit-learn's 8x8 digits; dense 4 epochs, sparse 4 (half of each layer's weights pruned),
re-dense 4 at a tenth of the learning rate. Prints each phase's switch and results.

    python examples/transformers_dsd.py     # about 10 s on a CPU
"""

import logging
import tempfile

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from dsd import Plan
from dsd.integrations.transformers import DSDCallback


class Digits(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.pixel_values = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16
        self.labels = torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


class PhaseReport(TrainerCallback):
    """At the end of each phase: test accuracy and the fraction of pruned-layer weights at 0."""

    def __init__(self, dsd_callback, test):
        self.dsd_callback, self.test, self.rows = dsd_callback, test, []

    def on_epoch_end(self, args, state, control, model, **kwargs):
        dsd = self.dsd_callback.dsd
        epoch = round(state.epoch) - 1
        if epoch + 1 != dsd.plan.starts[dsd.phase_index] + dsd.phase.length:
            return
        model.eval()
        with torch.no_grad():
            predicted = model(pixel_values=self.test.pixel_values).logits.argmax(-1)
        model.train()
        zeros = sum((p == 0).sum().item() for _, p in dsd.named_prunable)
        weights = sum(p.numel() for _, p in dsd.named_prunable)
        self.rows.append((dsd.phase_index, dsd.phase, epoch + 1, zeros / weights,
                          (predicted == self.test.labels).float().mean().item()))


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # DSD's phase switches
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.2,
                                                        stratify=labels, random_state=0)
    train, test = Digits(train_x, train_y), Digits(test_x, test_y)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=10))

    plan = Plan.dsd(4, 4, 4, sparsity=0.5, redense_lr_factor=0.1)  # in epochs
    dsd_callback = DSDCallback(plan)
    report = PhaseReport(dsd_callback, test)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, num_train_epochs=plan.total,
                                 per_device_train_batch_size=32, learning_rate=3e-3,
                                 lr_scheduler_type="cosine", warmup_steps=20,
                                 logging_strategy="no", save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          callbacks=[dsd_callback, report])
        trainer.train()

    print(f"\noptimizer: {type(trainer.optimizer.optimizer).__name__} (the Trainer's AdamW, "
          "made masked in place); prunable tensors: "
          f"{len(dsd_callback.dsd.named_prunable)}")
    print(f"{'phase':>5}  {'kind':<6}  {'epochs':>6}  {'LR x':>5}  {'zeros':>6}  {'test acc':>8}")
    start = 1
    for index, phase, end, zeros, accuracy in report.rows:
        print(f"{index:>5}  {phase.kind:<6}  {f'{start}-{end}':>6}  {phase.lr_scale:>5g}  "
              f"{zeros:>6.1%}  {accuracy:>8.1%}")
        start = end + 1


if __name__ == "__main__":
    main()
