"""Triton kernel: copy sequences' pages into packed (varlen) K and V, dequantizing fp8.

Program ``(chunk, b)`` copies tokens ``[chunk * BLOCK_T, (chunk + 1) * BLOCK_T)`` of sequence ``b``,
all kv heads, for K and V: a tile of ``BLOCK_T * BLOCK_H`` rows of ``head_dim`` values (~16 KB),
so loads and stores are 16-byte vectors along ``head_dim`` and each program has enough bytes in
flight. Chunks past a sequence's length are fully masked (no memory traffic).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .backend import interpreting, scale_launch_args
from .interpreter_fixes import round_bits, round_mantissa


@triton.jit(do_not_specialize=["total_rows"])
def _gather_kv_kernel(
    k_cache_ptr, v_cache_ptr,            # [num_blocks, block_size, kv_heads, head_dim]
    k_scale_ptr, v_scale_ptr,            # fp8: [kv_heads] or [num_blocks, block_size, kv_heads] float32
    block_table_ptr,                     # [batch, max_blocks] int32
    seq_lens_ptr,                        # [batch] int32
    cu_seqlens_ptr,                      # [batch + 1] int32
    k_out_ptr, v_out_ptr,                # [total_rows, kv_heads, head_dim], contiguous
    total_rows,                          # rows of k_out/v_out: rows outside [0, total_rows) are dropped
    stride_bt_b,
    stride_cache_b, stride_cache_t, stride_cache_h,
    stride_scale_b, stride_scale_t, stride_scale_h,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SCALE_MODE: tl.constexpr,            # 0 none, 1 per head, 2 per token and head
    ROUND_BITS: tl.constexpr,            # interpreter only: mantissa bits of the float32 -> out dtype store
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    out_start = tl.load(cu_seqlens_ptr + b).to(tl.int64)

    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    tok = chunk * BLOCK_T + rows // BLOCK_H
    head = rows % BLOCK_H
    out_row = out_start + tok
    row_ok = (tok < seq_len) & (head < KV_HEADS) & (out_row >= 0) & (out_row < total_rows)
    block = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt_b + tok // BLOCK_SIZE, mask=row_ok,
                    other=0).to(tl.int64)
    offset = tok % BLOCK_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        mask = row_ok[:, None]  # constant along head_dim: keeps 16-byte vector accesses
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    src = (block * stride_cache_b + offset * stride_cache_t + head * stride_cache_h)[:, None] + offs_d[None, :]
    dst = (out_row * (KV_HEADS * HEAD_DIM) + head * HEAD_DIM)[:, None] + offs_d[None, :]

    k = tl.load(k_cache_ptr + src, mask=mask)
    v = tl.load(v_cache_ptr + src, mask=mask)
    if SCALE_MODE != 0:
        if SCALE_MODE == 1:
            scale_off = head * stride_scale_h
        else:
            scale_off = block * stride_scale_b + offset * stride_scale_t + head * stride_scale_h
        ks = tl.load(k_scale_ptr + scale_off, mask=row_ok, other=0.0)
        vs = tl.load(v_scale_ptr + scale_off, mask=row_ok, other=0.0)
        k = k.to(tl.float32) * ks[:, None]
        v = v.to(tl.float32) * vs[:, None]
    if ROUND_BITS != 0:
        k = round_mantissa(k.to(tl.float32), ROUND_BITS)
        v = round_mantissa(v.to(tl.float32), ROUND_BITS)
    tl.store(k_out_ptr + dst, k.to(k_out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_out_ptr + dst, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def gather_kv_triton(k_cache, v_cache, block_table, seq_lens, cu_seqlens, k_out, v_out,
                     k_scale=None, v_scale=None) -> None:
    """Launch :func:`_gather_kv_kernel` into preallocated ``k_out``/``v_out`` (checked by the caller).

    Rows that ``cu_seqlens`` places outside ``k_out`` (a wrong count the caller could not check
    without a device sync) are dropped, never written.
    """
    batch, max_blocks = block_table.shape
    _, block_size, kv_heads, head_dim = k_cache.shape
    if batch == 0 or k_out.shape[0] == 0:
        return
    scale_mode, k_scale, v_scale, scale_strides = scale_launch_args(k_cache, v_cache, k_scale, v_scale)
    block_h = triton.next_power_of_2(kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    block_t = max(1, 8192 // (block_h * block_d))  # ~16 KB of bf16 K per program
    # the grid covers the table's capacity (no host sync on seq_lens); chunks past a length are masked
    grid = (triton.cdiv(max_blocks * block_size, block_t), batch)
    _gather_kv_kernel[grid](
        k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, cu_seqlens, k_out, v_out, k_out.shape[0],
        block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides,
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, SCALE_MODE=scale_mode,
        ROUND_BITS=round_bits(k_out.dtype, interpreting() and k_out.dtype != k_cache.dtype),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


__all__ = ["gather_kv_triton"]
