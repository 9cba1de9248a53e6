"""A DSD plan: the phases (dense / sparse), their lengths, sparsity or N:M pattern (or the
model's own zeros), learning-rate scale, and which parameters are pruned. Plans are plain
frozen data; `DSD` (runner.py) carries them out.
"""

import bisect
import math
from dataclasses import asdict, dataclass, field, replace

import dsd_kernels
from dsd_kernels import _checks

KINDS = ("dense", "sparse")
UNITS = ("epochs", "steps")
# Where a sparse phase's masks come from: a magnitude selection (or an N:M pattern), or the
# prunable tensors' current exact zeros (a model that is already sparse).
MASKS = ("magnitude", "zeros")


def as_patterns(name: str, patterns) -> tuple[str, ...]:
    """`patterns` (one fnmatch pattern, or an iterable of them) as a tuple; `name` (include
    or exclude) names the argument in the error."""
    if isinstance(patterns, str):
        return as_patterns(name, (patterns,))
    if not hasattr(patterns, "__iter__"):
        raise ValueError(f"{name} must be a pattern or a list of patterns, got {patterns!r}")
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{name} patterns must be non-empty strings, got {pattern!r}")
    return patterns


@dataclass(frozen=True)
class Phase:
    """One phase of a plan: `length` epochs or steps (the plan's unit) of dense or masked
    training.

    Args:
        kind: ``"dense"`` (every weight trains) or ``"sparse"`` (the prunable weights are pruned
            when the phase starts and stay zero under a fixed mask).
        length: epochs or steps of the phase, at least 1.
        sparsity: fraction of each prunable tensor pruned (``"sparse"`` only), in [0, 1);
            None: 0, or 1 - N/M with a `pattern`.
        lr_scale: factor on the learning rate of every param group (the optimizer's or its
            scheduler's ``lr``) during the phase; a positive finite number.
        pattern: ``"N:M"`` (or an (n, m) pair; ``"sparse"`` only): in every group of M
            consecutive weights along dim 1 (a Linear's in_features, a Conv's in_channels) the
            N largest magnitudes are kept (`dsd_kernels.nm_masks`), which implies sparsity
            1 - N/M. Kept as the string ``"N:M"``. None: unstructured magnitude pruning.
        masks: ``"magnitude"`` (``"sparse"`` phases prune by magnitude or `pattern`), or
            ``"zeros"`` (``"sparse"`` only): the masks are the prunable tensors' exact zeros
            when the phase starts (`dsd_kernels.nonzero_masks`), so a model that is already
            sparse keeps its sparsity; its `sparsity` is None (whatever the model holds).

    Raises:
        ValueError: If `kind` is neither ``"dense"`` nor ``"sparse"``, `length` is not an int
            >= 1, `sparsity` is outside [0, 1) or nonzero on a dense phase, `pattern` is not
            N:M with 1 <= N < M <= 64, is given on a dense phase or with another sparsity
            than 1 - N/M, `lr_scale` is not a positive finite number, `masks` is unknown,
            or ``"zeros"`` on a dense phase or with a sparsity or pattern.
    """

    kind: str
    length: int
    sparsity: float | None = None
    lr_scale: float = 1.0
    pattern: str | None = None
    masks: str = "magnitude"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"phase kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"every phase needs at least 1 epoch or step, got {self.length!r}")
        if self.masks not in MASKS:
            raise ValueError(f"masks must be one of {MASKS}, got {self.masks!r}")
        if self.masks == "zeros":
            self._check_zeros()
            return
        if self.pattern is not None:
            if self.kind == "dense":
                raise ValueError("a dense phase has no pattern; use kind='sparse'")
            n, m = _checks.pattern(self.pattern)
            implied = 1 - n / m
            if self.sparsity is not None and not math.isclose(self.sparsity, implied):
                raise ValueError(f"sparsity {self.sparsity!r} contradicts pattern {n}:{m}, "
                                 f"which prunes {implied:g}; give one or the other")
            object.__setattr__(self, "pattern", f"{n}:{m}")  # frozen: the canonical form
            object.__setattr__(self, "sparsity", implied)
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.0)
        dsd_kernels.check_sparsity(self.sparsity)
        if self.kind == "dense" and self.sparsity != 0:
            raise ValueError("a dense phase has no sparsity; use kind='sparse'")
        self._check_lr_scale()

    def _check_zeros(self):
        if self.kind == "dense":
            raise ValueError("a dense phase has no masks; masks='zeros' needs kind='sparse'")
        given = "sparsity" if self.sparsity is not None else "pattern" \
            if self.pattern is not None else None
        if given:
            raise ValueError(f"masks='zeros' keeps the zeros the model has, so it takes no "
                             f"{given}; give one or the other")
        self._check_lr_scale()

    def _check_lr_scale(self):
        if not (isinstance(self.lr_scale, (int, float)) and math.isfinite(self.lr_scale)
                and self.lr_scale > 0):
            raise ValueError(f"lr_scale must be a positive number, got {self.lr_scale!r}")


@dataclass(frozen=True)
class Plan:
    """Phases run back to back: what `DSD` carries out. Frozen data; `Plan.dsd` and
    `Plan.from_lengths` build the usual ones.

    The prunable parameters are by default the trained (``requires_grad``) weights of Linear,
    Conv, RNN/LSTM/GRU and Embedding layers (`dsd.prunable_parameters`).

    Args:
        phases: the `Phase` objects, in order; at least one.
        unit: ``"epochs"`` (`DSD.epoch_start`) or ``"steps"`` (`DSD.step_start`): what the
            phases' lengths count.
        scope: ``"layer"`` prunes each tensor on its own (the paper); ``"global"`` ranks all
            prunable tensors together.
        include: fnmatch patterns on parameter names (e.g. ``"fc*.weight"``), one string or
            a list; when given, they replace the default selection.
        exclude: patterns of parameter names never pruned, one string or a list.

    With an N:M `Phase.pattern`, the selected tensors that can take it (2+ dims, dim 1 a
    multiple of M: `dsd_kernels.nm_eligible`) get N:M masks and the others stay dense. A
    sparse phase with ``masks="zeros"`` masks the selected tensors' exact zeros.

    Raises:
        ValueError: If `phases` is empty or holds something other than `Phase` objects,
            `unit` or `scope` is unknown, a pattern is not a non-empty string, a phase
            has an N:M pattern while `scope` is ``"global"``, or a ``masks="zeros"`` phase
            follows a dense phase (which fills the zeros in).
    """

    phases: tuple[Phase, ...]
    unit: str = "epochs"
    scope: str = "layer"
    include: tuple[str, ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "phases", tuple(self.phases))
        object.__setattr__(self, "include", as_patterns("include", self.include))
        object.__setattr__(self, "exclude", as_patterns("exclude", self.exclude))
        if not self.phases:
            raise ValueError("a plan needs at least one phase")
        for phase in self.phases:
            if not isinstance(phase, Phase):
                raise ValueError(f"plan phases must be Phase objects, got {type(phase).__name__}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.scope not in dsd_kernels.SCOPES:
            raise ValueError(f"scope must be one of {dsd_kernels.SCOPES}, got {self.scope!r}")
        if self.scope == "global" and self.patterns:
            raise ValueError(f"pattern {self.patterns[0]} keeps N in every group of M weights, "
                             "so it has no global ranking; use scope='layer'")
        kinds = [phase.kind for phase in self.phases]
        for index, phase in enumerate(self.phases):
            if phase.masks == "zeros" and "dense" in kinds[:index]:
                raise ValueError(f"phase {index} keeps the model's zeros (masks='zeros') but "
                                 f"follows dense phase {kinds.index('dense')}, which fills them "
                                 "in; it must come before any dense phase (S or S-D)")

    @property
    def patterns(self) -> tuple[str, ...]:
        """The distinct N:M patterns of the sparse phases, in order ("2:4", ...); empty for
        unstructured plans."""
        return tuple(dict.fromkeys(p.pattern for p in self.phases if p.pattern is not None))

    @classmethod
    def sparse(cls, length: int, *, masks: str = "magnitude", sparsity: float | None = None,
               pattern=None, unit: str = "epochs", scope: str = "layer", include=(),
               exclude=()) -> "Plan":
        """One sparse phase: fine-tune under fixed masks. ``Plan.sparse(n, masks="zeros")``
        keeps the sparsity a model already has (its exact zeros); ``Plan.sparse(n,
        sparsity=0.5)`` prunes by magnitude first.

        Args:
            length: epochs or steps of the phase.
            masks: ``"magnitude"`` or ``"zeros"``, as in `Phase`.
            sparsity: as in `Plan.from_lengths` (magnitude masks only).
            pattern: ``"N:M"``, as in `Phase` (magnitude masks only).
            unit, scope, include, exclude: as in `Plan`.

        Raises:
            ValueError: as `Plan.from_lengths`.
        """
        return cls.from_lengths([length], first="sparse", masks=masks, sparsity=sparsity,
                                pattern=pattern, unit=unit, scope=scope, include=include,
                                exclude=exclude)

    @classmethod
    def dsd(cls, dense: int, sparse: int, redense: int, *, sparsity: float | None = None,
            iterations: int = 1, redense_lr_factor: float = 0.1, unit: str = "epochs",
            scope: str = "layer", include=(), exclude=(), pattern=None,
            masks: str = "magnitude") -> "Plan":
        """Dense, then `iterations` x (sparse, re-dense): DSD, DSDSD, ...

        Args:
            dense: length of the first dense phase.
            sparse: length of each sparse phase.
            redense: length of each re-dense phase.
            sparsity: fraction of each prunable tensor pruned in the sparse phases, in [0, 1);
                None: 0.5, or 1 - N/M with a `pattern`.
            iterations: how many (sparse, re-dense) pairs follow the dense phase; 2 is DSDSD.
            redense_lr_factor: each re-dense phase multiplies the learning rate by this; a
                sparse phase keeps the rate of the phase before it.
            unit, scope, include, exclude: as in `Plan`.
            pattern: ``"N:M"`` structured sparsity of the sparse phases, as in `Phase`.
            masks: as in `Phase`; ``"zeros"`` is refused here, after the dense phase.

        Raises:
            ValueError: If `iterations` is not an int >= 1, or as `Plan.from_lengths`.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        return cls.from_lengths([dense] + [sparse, redense] * iterations, sparsity=sparsity,
                                redense_lr_factor=redense_lr_factor, unit=unit, scope=scope,
                                include=include, exclude=exclude, pattern=pattern, masks=masks)

    @classmethod
    def from_lengths(cls, lengths, *, sparsity: float | None = None,
                     redense_lr_factor: float = 0.1, unit: str = "epochs", scope: str = "layer",
                     include=(), exclude=(), first: str = "dense", pattern=None,
                     masks: str = "magnitude") -> "Plan":
        """Phases of alternating kinds: [10, 10, 10] is dense 10, sparse 10, re-dense 10;
        with ``first="sparse"``, [10, 10] is sparse 10, re-dense 10 (S-D on a converged
        network); ``Plan.from_lengths([10], first="sparse")`` is sparse only.

        Args:
            lengths: the length of each phase, in order.
            sparsity: fraction of each prunable tensor pruned in the sparse phases, in [0, 1);
                None: 0.5, or 1 - N/M with a `pattern`, or the model's own with
                ``masks="zeros"``.
            redense_lr_factor: each re-dense phase (a dense phase after a sparse one)
                multiplies the learning rate by this; a sparse phase keeps the rate of the
                phase before it.
            first: kind of the first phase, ``"dense"`` or ``"sparse"``.
            unit, scope, include, exclude: as in `Plan`.
            pattern: ``"N:M"`` structured sparsity of the sparse phases, as in `Phase`.
            masks: where the sparse phases' masks come from, as in `Phase`: ``"zeros"`` (the
                model's exact zeros) needs ``first="sparse"`` and a single sparse phase (one
                after a dense phase is refused).

        Raises:
            ValueError: If `lengths` is not a non-empty list of ints >= 1,
                `redense_lr_factor` is not > 0, `first` is unknown, or as `Phase` and `Plan`.
        """
        if not (isinstance(redense_lr_factor, (int, float)) and redense_lr_factor > 0):
            raise ValueError(f"redense_lr_factor must be > 0, got {redense_lr_factor!r}")
        if first not in KINDS:
            raise ValueError(f"first must be one of {KINDS}, got {first!r}")
        if isinstance(lengths, str) or not hasattr(lengths, "__iter__"):
            raise ValueError(f"lengths must be a list of ints, got {lengths!r}")
        lengths = list(lengths)
        if not lengths:
            raise ValueError("a plan needs at least one phase")
        if sparsity is None and pattern is None and masks != "zeros":
            sparsity = 0.5
        phases, lr_scale = [], 1.0
        offset = KINDS.index(first)
        for i, length in enumerate(lengths):
            if KINDS[(i + offset) % 2] == "dense":
                if i > 0:
                    lr_scale *= redense_lr_factor
                phases.append(Phase("dense", length, lr_scale=lr_scale))
            else:
                phases.append(Phase("sparse", length, sparsity=sparsity, lr_scale=lr_scale,
                                    pattern=pattern, masks=masks))
        return cls(tuple(phases), unit=unit, scope=scope, include=include, exclude=exclude)

    @property
    def starts(self) -> list[int]:
        """Where each phase begins (in epochs or steps from 0)."""
        starts, total = [], 0
        for phase in self.phases:
            starts.append(total)
            total += phase.length
        return starts

    @property
    def total(self) -> int:
        """Length of the whole plan, in its unit."""
        return sum(phase.length for phase in self.phases)

    def phase_at(self, position: int) -> int:
        """Index of the phase that the 0-based epoch or step `position` belongs to.

        Raises:
            ValueError: If `position` is not an int in [0, `total`).
        """
        if isinstance(position, bool) or not isinstance(position, int):
            raise ValueError(f"the {self.unit[:-1]} must be an int, got {position!r}")
        if not 0 <= position < self.total:
            raise ValueError(f"{self.unit[:-1]} {position} is outside the plan's {self.total} "
                             f"{self.unit} (0..{self.total - 1})")
        return bisect.bisect_right(self.starts, position) - 1

    def dense_baseline(self) -> "Plan":
        """The fair baseline: the same phase lengths and learning-rate scales, all dense."""
        return replace(self, phases=tuple(Phase("dense", p.length, lr_scale=p.lr_scale)
                                          for p in self.phases))

    @property
    def keeps_zeros(self) -> bool:
        """Whether a sparse phase's masks are the model's exact zeros (``masks="zeros"``)."""
        return any(phase.masks == "zeros" for phase in self.phases)

    def to_dict(self) -> dict:
        """The plan as plain data (what checkpoints keep); `from_dict` reads it back (a phase
        saved without ``masks`` has magnitude masks)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The plan that `to_dict` gave `data`."""
        data = dict(data)
        data["phases"] = tuple(Phase(**phase) for phase in data["phases"])
        return cls(**data)
