"""The Triton kernels' conversions (backends/triton/convert.py) against torch's casts, bit
for bit, over the fp32 patterns where rounding is delicate: signed zeros, denormals, ties,
the largest finite values and those that round up to Inf, Inf, and NaNs with every kind of
payload. The GPU turns every fp32 NaN into 0x7FFFFFFF, which the interpreter's NumPy never
produces, so NaN payloads are fed as bit patterns.

Runs on CUDA when a GPU is present, else in Triton's interpreter (conftest sets
TRITON_INTERPRET=1).
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from dsd_kernels.backends.triton.convert import from_fp32, to_fp32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

NANS = [0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7F808000, 0xFFC00001]
FINITE_AND_INF = [
    0x00000000, 0x80000000,  # signed zeros
    0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000, 0x007FFFFF,
    0x807FFFFF, 0x00800000,  # fp32 denormals, bf16 ties among them, the smallest normal
    0x3F800000, 0x3F807FFF, 0x3F808000, 0x3F808001, 0x3F818000, 0xBF818000,  # bf16 ties at 1
    0x3F801000, 0x3F802000, 0x3F803000,  # fp16 ties at 1
    0x387FC000, 0x33800000, 0x33000000, 0x33000001, 0xB3000001,  # fp16 denormals and ties
    0x477FE000, 0x477FEFFF, 0x477FF000, 0xC77FF000,  # fp16 max finite, and past it: Inf
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,  # bf16 max finite, and past it: Inf
    0x7F800000, 0xFF800000,  # Inf
]


BLOCK = 1024


@triton.jit
def _narrow_kernel(x_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    tl.store(y_ptr + index, from_fp32(tl.load(x_ptr + index, mask=inside), DTYPE), mask=inside)


@triton.jit
def _widen_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    tl.store(y_ptr + index, to_fp32(tl.load(x_ptr + index, mask=inside)), mask=inside)


def _fp32(patterns) -> torch.Tensor:
    """fp32 values with the given bit patterns (unsigned 32-bit ints)."""
    signed = [p - (1 << 32) if p >= 1 << 31 else p for p in patterns]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def _narrow(x: torch.Tensor, dtype) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=dtype, device=DEVICE)
    _narrow_kernel[(triton.cdiv(x.numel(), BLOCK),)](x.to(DEVICE), out, x.numel(),
                                                     DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK)
    return out.cpu()


def _random_patterns(count: int) -> list[int]:
    bits = torch.randint(0, 1 << 32, (count,), generator=torch.Generator().manual_seed(0))
    return bits.tolist()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's NumPy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finite_values_round_to_nearest_even_as_torch(dtype):
    x = _fp32(FINITE_AND_INF + [p for p in _random_patterns(4096)
                                if p & 0x7FFFFFFF <= 0x7F800000])
    got, expected = _narrow(x, dtype), x.to(dtype)
    differ = (got.view(torch.int16) != expected.view(torch.int16)).nonzero().flatten()
    assert not differ.numel(), [(hex(x[i:i + 1].view(torch.int32).item() & 0xFFFFFFFF),
                                 got[i].item(), expected[i].item()) for i in differ[:8]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_stays_nan(dtype):
    patterns = NANS + [p for p in _random_patterns(4096) if p & 0x7FFFFFFF > 0x7F800000]
    got = _narrow(_fp32(patterns), dtype)
    not_nan = [hex(p) for p, value in zip(patterns, got.tolist()) if value == value]
    assert not not_nan, f"{len(not_nan)} NaNs lost, e.g. {not_nan[:8]}"
    if dtype == torch.bfloat16:  # the sign survives, and the NaN is quiet
        bits = got.view(torch.int16).int() & 0xFFFF
        assert [b >> 15 for b in bits.tolist()] == [p >> 31 for p in patterns]
        assert (bits & 0x0040 != 0).all()


def test_bf16_widens_exactly():
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    x = patterns.view(torch.bfloat16).to(DEVICE)
    out = torch.empty(x.numel(), dtype=torch.float32, device=DEVICE)
    _widen_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK)
    assert torch.equal(out.cpu().view(torch.int32) >> 16, patterns.int())
    assert not (out.cpu().view(torch.int32) & 0xFFFF).any()
