"""Triton kernel: write new tokens' K and V into their cache slots (quantizing for fp8).

Each program moves ``BLOCK_R`` rows, a row being one (token, kv head) pair of ``head_dim``
values, for K and for V. Rows are the flattened ``[num_tokens, kv_heads]`` grid, so a program
covers several tokens and the grid stays small whatever ``kv_heads`` is. Offsets are int64:
a large cache exceeds 2**31 elements.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .backend import interpreting, scale_launch_args
from .interpreter_fixes import round_bits, round_mantissa, round_to_e4m3

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn value


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr,                  # [num_tokens, kv_heads, head_dim]
    k_cache_ptr, v_cache_ptr,            # [num_blocks, block_size, kv_heads, head_dim]
    k_scale_ptr, v_scale_ptr,            # fp8: [kv_heads] or [num_blocks, block_size, kv_heads] float32
    slot_ptr,                            # [num_tokens] int32/int64, -1 = skip
    num_rows,                            # num_tokens * kv_heads
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_cache_b, stride_cache_t, stride_cache_h,
    stride_scale_b, stride_scale_t, stride_scale_h,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,            # tokens per page
    SCALE_MODE: tl.constexpr,            # 0 no fp8, 1 per-head scale given, 2 per-token-head scale computed
    INTERPRET: tl.constexpr,             # TRITON_INTERPRET=1: round before casts (interpreter_fixes)
    ROUND_BITS: tl.constexpr,            # interpreter only: mantissa bits of a float32 -> bf16/fp16 store
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    token = rows // KV_HEADS
    head = rows % KV_HEADS
    slot = tl.load(slot_ptr + token, mask=rows < num_rows, other=-1).to(tl.int64)
    row_ok = slot >= 0
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        mask = row_ok[:, None]  # constant along head_dim: keeps 16-byte vector accesses
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dst = (block * stride_cache_b + offset * stride_cache_t + head * stride_cache_h)[:, None] + offs_d[None, :]
    scale_off = block * stride_scale_b + offset * stride_scale_t + head * stride_scale_h

    k = tl.load(key_ptr + (token * stride_key_t + head * stride_key_h)[:, None] + offs_d[None, :], mask=mask,
                other=0.0)
    v = tl.load(value_ptr + (token * stride_value_t + head * stride_value_h)[:, None] + offs_d[None, :],
                mask=mask, other=0.0)
    if SCALE_MODE == 0:
        if ROUND_BITS != 0:
            k = round_mantissa(k.to(tl.float32), ROUND_BITS)
            v = round_mantissa(v.to(tl.float32), ROUND_BITS)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if SCALE_MODE == 1:
            ks = tl.load(k_scale_ptr + head * stride_scale_h, mask=row_ok, other=1.0)
            vs = tl.load(v_scale_ptr + head * stride_scale_h, mask=row_ok, other=1.0)
        else:
            ks = tl.max(tl.abs(k), axis=1) / FP8_MAX
            vs = tl.max(tl.abs(v), axis=1) / FP8_MAX
            tl.store(k_scale_ptr + scale_off, ks, mask=row_ok)
            tl.store(v_scale_ptr + scale_off, vs, mask=row_ok)
        ks = tl.where(ks > 0, ks, 1.0)  # an all-zero row stores zeros, not 0/0
        vs = tl.where(vs > 0, vs, 1.0)
        kq = tl.clamp(k / ks[:, None], -FP8_MAX, FP8_MAX)
        vq = tl.clamp(v / vs[:, None], -FP8_MAX, FP8_MAX)
        if INTERPRET:
            kq = round_to_e4m3(kq)
            vq = round_to_e4m3(vq)
        tl.store(k_cache_ptr + dst, kq.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, vq.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Launch :func:`_write_kv_kernel`; arguments as :func:`kvpool.kernels.write_kv` (checked there)."""
    num_tokens, kv_heads, head_dim = key.shape
    num_rows = num_tokens * kv_heads
    if num_rows == 0:
        return
    scale_mode, k_scale, v_scale, scale_strides = scale_launch_args(k_cache, v_cache, k_scale, v_scale)
    block_d = triton.next_power_of_2(head_dim)
    # ~16 KB of K (and as much of V) per program: enough bytes in flight, few programs.
    block_r = max(1, min(128, 8192 // block_d))
    grid = (triton.cdiv(num_rows, block_r),)
    _write_kv_kernel[grid](
        key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping, num_rows,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides,
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], SCALE_MODE=scale_mode,
        INTERPRET=interpreting(),
        ROUND_BITS=round_bits(k_cache.dtype, interpreting() and key.dtype != k_cache.dtype),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )


__all__ = ["write_kv_triton"]
