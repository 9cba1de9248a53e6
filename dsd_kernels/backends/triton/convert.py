"""Exact conversions between a stored dtype and the fp32 the kernels compute in.

bf16 is the top half of an fp32, so it is widened and rounded on its bits: that is exact for
subnormals too, and it does not depend on how a backend lowers the cast (Triton's interpreter
flushes bf16 subnormals when widening and truncates when narrowing; the GPU rounds to nearest
even, as torch does). fp16 and fp32 use ordinary casts, which are exact or round to nearest even
and keep NaN a NaN.
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
    """`value` rounded to nearest even in DTYPE; Inf stays Inf and NaN a NaN of its sign."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.int32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # A NaN is not rounded: its carry could clear the exponent or reach the sign (the GPU's
        # NaN is 0x7FFFFFFF), or a payload in the low half only would leave Inf. Its top half
        # with the quiet bit set is a NaN.
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(is_nan, bits | 0x00400000, rounded)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return value.to(DTYPE)
