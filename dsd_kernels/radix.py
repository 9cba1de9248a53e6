"""The exact radix select on magnitude keys: its digit plan, its driver over the
`magnitude_histogram` op, and the bracket's constants and rules. The one source of these for
Python; csrc/ repeats them (kDigits in dsd_cpu.h, the bracket's in select.cpp), and
tests/test_constants.py ties the copies.

See docs/design.md, Radix passes and The bracket.
"""

import torch

# (shift, width) of each digit, most significant first: bits 30..24, 23..16, 15..8, 7..0.
# At most 8 bits: 256 bins is what the Triton histogram takes (docs/design.md).
DIGITS = ((24, 7), (16, 8), (8, 8), (0, 8))
# Digits a dtype needs: below its mantissa the fp32 pattern is zero (fp16: bits 12..0,
# bf16: bits 15..0).
PASSES = {torch.float32: 4, torch.float16: 3, torch.bfloat16: 2}


def passes(xs) -> int:
    """How many digits a list needs: those of its widest dtype."""
    return max(PASSES[x.dtype] for x in xs)


def select(xs, rows, ks: torch.Tensor, reduce_=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row r, the key of the ks[r]-th smallest magnitude among the entries of the tensors
    with rows[i] == r (1 <= ks[r] <= their number), and how many entries with that key are
    among the ks[r] smallest (the ties to take). `reduce_(histogram)`, if given, combines each
    pass's histograms in place before they are read (an all_reduce over shards). One op call
    (and one reduce) per pass for all rows; everything stays on the device: no host sync."""
    prefix = torch.zeros(len(ks), dtype=torch.int64, device=ks.device)
    remaining = ks
    count = passes(xs)
    for shift, width in DIGITS[:count]:
        hist = torch.ops.dsd.magnitude_histogram(xs, rows, prefix, shift, width)
        if reduce_ is not None:
            reduce_(hist)
        cumulative = hist.cumsum(1)
        digit = torch.searchsorted(cumulative, remaining.unsqueeze(1)).squeeze(1)
        below = cumulative.gather(1, (digit - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        remaining = remaining - torch.where(digit > 0, below, 0)
        prefix = (prefix << width) | digit
    return prefix << DIGITS[count - 1][0], remaining


# The bracket: see docs/design.md, The bracket. Groups of more than BRACKETED_NUMEL keys
# sample blocks of SAMPLE_BLOCK keys, SAMPLE_PER_ROOT sqrt(n) keys in [MIN_SAMPLE, MAX_SAMPLE];
# [lo, hi] lies SIGMAS standard deviations (+ SLACK_RANKS) around the expected rank.
BRACKETED_NUMEL = 1 << 14
SAMPLE_BLOCK = 64
SAMPLE_PER_ROOT = 16.0
MIN_SAMPLE, MAX_SAMPLE = 4096, 1 << 16
SIGMAS = 4.5
SLACK_RANKS = 8.0


def sample_begins(total: int) -> torch.Tensor:
    """Where each sampled block of a group of `total` keys begins (int64, ascending)."""
    wanted = min(max(round(SAMPLE_PER_ROOT * total ** 0.5), MIN_SAMPLE), MAX_SAMPLE)
    blocks = max(1, min(wanted, total // 4) // SAMPLE_BLOCK)
    b = torch.arange(blocks, dtype=torch.int64)
    return torch.clamp((2 * b + 1) * total // (2 * blocks), max=total - SAMPLE_BLOCK)


def bracket_ranks(ks: torch.Tensor, totals: torch.Tensor, sizes: torch.Tensor,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks in each group's sorted sample of its bracket's lo and hi, for the
    ks-th smallest of `totals` keys with samples of `sizes` keys; a rank below 0 or past the
    sample leaves that side open. `scale` multiplies the width (0, for tests: lo = hi = the
    sample's quantile)."""
    ks, totals, sizes = (t.to(torch.float64) for t in (ks, totals, sizes))
    quantile = (ks - 0.5) / totals
    centre = quantile * sizes
    half_width = scale * (SIGMAS * torch.sqrt(sizes * quantile * (1 - quantile)) + SLACK_RANKS)
    lo, hi = torch.floor(centre - half_width), torch.ceil(centre + half_width)
    if scale == 0:
        lo = hi = torch.minimum(lo.clamp(min=0), sizes - 1)
    return lo.long(), hi.long()
