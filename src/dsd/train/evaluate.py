"""Loss and accuracy of a model on a split: during a run, and of a finished run's saved model."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import atomic_io
from ..config import RunConfig
from .compute import autocast, resolve_device, to_device
from .errors import RunError
from .prepare import prepare
from .run_dir import load_config

_EVAL_BATCH = 1024


def losses(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every prediction (one per example; one per character for text), in
    fp32 whatever the autocast dtype, and the number of correct ones."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    per_prediction = F.cross_entropy(flat, y.reshape(-1), reduction="none")
    return per_prediction, (flat.argmax(1) == y.reshape(-1)).sum()


@torch.no_grad()
def evaluate(model, x, y, config: RunConfig, device) -> tuple[float, float]:
    """Mean loss and accuracy over every prediction of (x, y)."""
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(y), _EVAL_BATCH):
        with autocast(config, device):
            batch_losses, correct = losses(model(to_device(x[i:i + _EVAL_BATCH], config, device)),
                                           y[i:i + _EVAL_BATCH].to(device))
        stats += torch.stack([batch_losses.double().sum(), correct.double()])
    loss_sum, correct = stats.tolist()
    predictions = y.numel()
    return loss_sum / predictions, correct / predictions


def evaluate_saved(run_dir, split: str, arm: str = "dsd") -> dict:
    """Evaluate a finished run's final model on one split of its task. The study calls it for
    the test split only after choosing its learning rates on validation.

    Args:
        run_dir: the run directory (it holds config.toml and the final model files).
        split: "train", "val" or "test".
        arm: "dsd" (model.pt) or "baseline" (baseline_model.pt).

    Returns:
        {"<split>_loss": ..., "<split>_acc": ...}, and "<split>_bpc" (bits per character)
        for a text task.

    Raises:
        RunDirError: `run_dir` is not a run directory.
        RunError: the model file is missing or unreadable, or the run's task or model cannot
            be prepared again.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    device = resolve_device(config.device)
    data, _, model = prepare(config, device)
    path = run_dir / ("model.pt" if arm == "dsd" else "baseline_model.pt")
    try:
        model.load_state_dict(atomic_io.load_torch(path))
    except atomic_io.ReadError as error:
        raise RunError(f"cannot evaluate: {error}") from None
    loss, acc = evaluate(model, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"),
                         config, device)
    result = {f"{split}_loss": loss, f"{split}_acc": acc}
    if data.kind == "text":
        result[f"{split}_bpc"] = loss / math.log(2)
    return result
