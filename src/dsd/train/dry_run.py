"""`dsd train --dry-run`: the optimizer, the parameters of the model and what the plan prunes
of each."""

import dsd_kernels
from dsd_kernels.optim import MaskedAdam, MaskedAdamW, MaskedSGD

from ..config import RunConfig
from ..optimizers import class_name
from ..runner import pattern_refusal, pattern_targets, prunable_parameters
from ..world import shard_units
from .arms import masked_optimizer, model_label, optimizer_call
from .compute import resolve_device
from .prepare import prepare
from .report import aligned


def dry_run(config: RunConfig) -> str:
    """What `dsd train --dry-run` prints: the task, the model and the plan, the optimizer's
    constructor call and its masked step (fused or general), then every parameter of the
    model, whether the plan prunes it and how many of its weights each sparse phase zeroes (a
    frozen one, requires_grad=False, is never pruned: it says so; under --pattern, one that
    cannot take the pattern stays dense and the reason is given; under --masks zeros, the
    --init model's zeros each keeps; under --shard, the modules made FSDP2 units). Nothing is
    written.

    Args:
        config: the run's options.

    Returns:
        The report, lines ending in newlines.

    Raises:
        RunError: as prepare() does: the task, the --init file or the model does not fit.
        ConfigError: the optimizer cannot be built with its arguments, or masked.
        ValueError: the plan selects nothing to prune, or nothing (or a parameter that
            --include names exactly) that can take --pattern.
    """
    data, init, model = prepare(config, resolve_device(config.device))
    plan = config.plan()
    optimizer = masked_optimizer(config, model.parameters())
    named_prunable = prunable_parameters(model, plan.include, plan.exclude)
    prunable = {name for name, _ in named_prunable}
    pattern = plan.patterns[0] if plan.patterns else None
    if pattern:  # refused here as the run would refuse it
        prunable = {name for name, _ in pattern_targets(named_prunable, pattern, plan.include)}
        n, m = map(int, pattern.split(":"))
    sparse = [phase.sparsity for phase in plan.phases if phase.kind == "sparse"]
    zeros = plan.keeps_zeros  # the masks are the --init model's zeros, counted here
    rows = [["parameter", "shape", "weights", "pruned"]]
    for name, p in model.named_parameters():
        pruned = "-"
        if not p.requires_grad:  # no gradient: a pruned weight could never regrow
            pruned = "- (frozen)"
        elif pattern and name in dict(named_prunable) and name not in prunable:
            pruned = f"0 (stays dense: {pattern_refusal(p, pattern)})"
        elif name in prunable and not sparse:
            pruned = "0 (no sparse phase)"
        elif name in prunable and zeros:
            pruned = f"{int((p.detach() == 0).sum()):,} (its zeros, kept)"
        elif name in prunable and plan.scope == "global":
            pruned = "ranked with all prunable tensors"
        elif name in prunable and pattern:
            pruned = f"{p.numel() // m * (m - n):,} ({pattern})"
        elif name in prunable:
            pruned = ", ".join(f"{dsd_kernels.pruned_count(s, p.numel()):,}"
                               for s in sorted(set(sparse)))
        rows.append([name, "x".join(map(str, p.shape)), f"{p.numel():,}", pruned])
    total = sum(p.numel() for p in model.parameters())
    selected = sum(p.numel() for name, p in model.named_parameters() if name in prunable)
    lines = [f"task {config.task} ({data.source or 'embedded'}): {len(data.y_train):,} training, "
             f"{len(data.y_val):,} validation, {len(data.y_test):,} test examples of shape "
             f"{tuple(data.signal_shape)}, {data.num_classes} classes",
             f"model {model_label(config, data)}: {total:,} parameters, {len(prunable)} tensors "
             + (f"take pattern {pattern}, {len(named_prunable) - len(prunable)} other prunable "
                "stay dense," if pattern else "prunable")
             + f" holding {selected:,} weights ({selected / total:.1%}); plan "
             f"{','.join(map(str, config.phases))} epochs from {config.first_phase}, "
             + ("masks from the --init model's exact zeros" if zeros else
                f"pattern {config.pattern} (sparsity {config.sparsity:g})" if config.pattern
                else f"sparsity {config.sparsity:g} ({config.scope} scope)")
             + (f", from {config.init} ({init.holds})" if init else "")
             + (f": {dsd_kernels.pruned_count(config.sparsity, selected):,} weights pruned in all"
                if plan.scope == "global" and sparse and not zeros else "")]
    lines.append(f"optimizer {config.optimizer}: {_describe(config, optimizer)}")
    if config.shard:
        units = [name for name, module in model.named_modules()
                 if any(module is unit for unit in shard_units(model))]
        lines.append(f"sharded (--shard): FSDP2 fully_shard on {', '.join(units)} and the root "
                     "model; each rank holds dim-0 slices of every parameter, of its optimizer "
                     "state and of its mask; the masks' thresholds are computed on the slices")
    lines += aligned(rows)
    return "\n".join(lines) + "\n"


def _describe(config: RunConfig, optimizer) -> str:
    """The optimizer's constructor call and its masked step: dsd's fused one, or the
    optimizer's own between dsd's masking passes (general)."""
    cls, kwargs = optimizer_call(config)
    call = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    path = "fused" if isinstance(optimizer, (MaskedSGD, MaskedAdam, MaskedAdamW)) else "general"
    return f"{class_name(cls)}({call}), {path} masked step"
