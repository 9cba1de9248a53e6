"""Drop-in masked versions of torch.optim.SGD, Adam and AdamW.

Each subclasses its torch.optim class, so the constructor, defaults, param groups, state
layout and state_dict format are torch's own, and LR schedulers, GradScaler and checkpoints
work unchanged. `step` runs one fused masked update per device and param group: a pruned
weight and its optimizer state are exactly 0 after every step, whatever the gradient. Its
checks and bucketing are kept per param group and reused while nothing they were built from
has changed (`plan.Plan`), so a step in a training loop costs little host time per tensor.

    opt = MaskedAdamW(model.parameters(), lr=1e-3)
    opt.set_masks({model.fc.weight: mask})   # prunes now; the mask holds until cleared
    opt.clear_masks()                        # pruned weights regrow from 0, with 0 state

An optimizer that already exists (held by a scheduler, a GradScaler, Lightning, Accelerate)
is converted in place by `make_masked_(opt)`: the same object becomes masked. Any other
torch.optim.Optimizer (torch.optim's others, subclasses, other libraries' optimizers) becomes a
masked subclass of its class whose step is its own between dsd's multi-tensor passes.

Modules: `masked` (the fused classes), `plan` (step plans and buckets), `general` (the masked
step of every other optimizer), `fresh` (the fresh state it resets pruned positions to),
`convert` (make_masked_).
"""

from .convert import make_masked_
from .masked import LR_SCALE, MaskedAdam, MaskedAdamW, MaskedSGD, step_lr

__all__ = ["MaskedSGD", "MaskedAdam", "MaskedAdamW", "make_masked_", "step_lr", "LR_SCALE"]
