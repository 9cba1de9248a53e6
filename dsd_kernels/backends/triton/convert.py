"""Exact conversions between a stored dtype and the fp32 the kernels compute in.

bf16 is the top half of an fp32, so it is widened and rounded on its bits: that is exact for
subnormals too, and it does not depend on how a backend lowers the cast (Triton's interpreter
flushes bf16 subnormals when widening and truncates when narrowing; the GPU rounds to nearest
even, as torch does). fp16 and fp32 use ordinary casts, which are exact or round to nearest even.
"""

import triton
import triton.language as tl


@triton.jit
def to_fp32(x):
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def from_fp32(value, DTYPE: tl.constexpr):
    """`value` rounded to nearest even in DTYPE (finite values; canonical NaN stays NaN)."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.int32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return value.to(DTYPE)
