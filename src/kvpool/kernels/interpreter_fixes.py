"""Rounding helpers for Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) only.

The interpreter's float32 -> narrower float casts are not IEEE round-to-nearest-even: to
bf16/fp16 they truncate, and to fp8 e4m3 they drop the carry when rounding up crosses a power of
two (124.3 becomes 64). The kernels call these helpers under a ``constexpr`` flag set only when
interpreting, so the value handed to the cast is already exactly representable and the cast is
exact; on GPUs the hardware casts round correctly and the helpers are compiled out.
"""
import triton
import triton.language as tl


@triton.jit
def round_mantissa(x, BITS: tl.constexpr):
    """Round float32 ``x`` to ``BITS`` mantissa bits (7: bf16, 10: fp16), ties to even, carry kept."""
    DROP: tl.constexpr = 23 - BITS
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & (-(1 << DROP))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(x):
    """Round float32 ``x`` (already within +-448) to the nearest float8_e4m3fn value, ties to even."""
    normal = round_mantissa(x, 3)
    sub = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # subnormals: multiples of 2**-9, RTNE
    sub = tl.where(sub == 0.0, x * 0.0, sub)  # keep the sign of zero
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


def round_bits(dtype, interpreting: bool) -> int:
    """``ROUND_BITS`` constexpr for a store of float32 values into ``dtype`` (0: no rounding needed)."""
    import torch
    if not interpreting:
        return 0
    return {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 0)
