"""The digit plan of the exact radix select on magnitude keys, and its driver over the
`magnitude_histogram` op: written once for every path that selects by histograms (the C++
selection's fallback, csrc/select.cpp, repeats the plan as kDigits in csrc/dsd_cpu.h).

A key is the fp32 bit pattern of |x| (31 bits), which orders like the magnitudes. A pass counts
one digit of the keys that still share the digits chosen so far; the digit whose bucket holds
the wanted rank is appended to the prefix and the rank made relative to it. fp16 and bf16
magnitudes are exact in fp32 and leave the low bits of their keys zero, so lists without fp32
need fewer passes.
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
