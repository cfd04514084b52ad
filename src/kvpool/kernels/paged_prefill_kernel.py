"""Triton kernel: paged prefill attention (FlashAttention-2 style) of new tokens over their pages.

Program ``(q_tile, kv_head)`` owns up to ``BLOCK_Q`` consecutive new tokens of ONE sequence and every
q head of one KV head: the tile's ``BLOCK_M = BLOCK_Q * GROUP_PAD`` rows are (token, q head) pairs, row
``r`` being token ``r // GROUP_PAD`` and head ``r % GROUP_PAD`` of the group, so one loaded K/V tile
serves the whole GQA group. Keys stream in tiles of ``BLOCK_N`` positions read straight from the pages
(each key's page looked up in the block table; a tile inside one page looks it up once), with
``[BLOCK_M, D] x [D, BLOCK_N]`` for the scores, ``[BLOCK_M, BLOCK_N] x [BLOCK_N, D]`` for the values and
an online softmax in float32 (base 2).

Tiles of queries are numbered over the whole batch as vLLM's unified attention does: sequence ``b``'s
tiles start at ``query_start_loc[b] // BLOCK_Q + b``, so ``num_new_tokens // BLOCK_Q + batch`` programs
cover every sequence with no host-side read of the lengths (a program finds its sequence by binary
search; spare programs exit).

Key tiles are visited in three runs: the window's lower edge (masked), the tiles every query of the
tile sees in full (no mask), and the causal diagonal (masked). Tiles no query sees are skipped.

Safety whatever the index values (the wrapper checks them on the host when that costs no sync): query
rows are clamped to ``[0, num_new_tokens)``, ``seq_lens`` to the table's width, block ids to
``[0, num_blocks)``, so a wrong value gives a wrong answer, never an out-of-bounds access.

fp8 pages are widened to the query dtype and their scales folded into the scores (``k``) and the
probabilities / accumulator (``v``), as in :mod:`kvpool.kernels.decode`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .backend import interpreting, scale_launch_args
from .decode import _launch_with_stage_fallback, _tanh
from .interpreter_fixes import round_bits, round_mantissa

LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_loc_ptr, tile, batch, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles hold ``tile``: the last ``b`` with ``qsl[b] // BLOCK_Q + b <= tile``."""
    lo: tl.int32 = 0  # typed: a loop-carried value must keep one type
    hi = batch
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return tl.maximum(lo - 1, 0)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row,
    tile_lo, tile_hi, key_lo, seq_len, q_pos, num_blocks,
    sm_scale, soft_cap, window, kv_head,
    stride_cache_b, stride_cache_t, stride_cache_h,
    stride_scale_b, stride_scale_t, stride_scale_h,
    offs_d, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr,
    SCALE_MODE: tl.constexpr, DOT_FP32: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGE_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax over key tiles ``[tile_lo, tile_hi)``; ``MASKED`` applies causality, the window and
    the sequence's end per (row, key); unmasked runs hold only keys every row of the tile may read."""
    head_off = kv_head.to(tl.int64) * stride_cache_h
    for tile in tl.range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < seq_len) & (offs_n >= key_lo)  # all true in an unmasked run
        if PAGE_PER_TILE:  # BLOCK_N divides block_size: the tile lies in one page
            block = tl.load(bt_row + (tile * BLOCK_N) // BLOCK_SIZE)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
        else:
            block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
        in_page = offs_n % BLOCK_SIZE
        row = block * stride_cache_b + in_page * stride_cache_t + head_off
        if MASKED:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        if (not MASKED) and (BLOCK_D == HEAD_DIM):  # every key of the tile is read: plain vector loads
            k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :])
            v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :])
        else:
            k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k))
        if SCALE_MODE == 2:
            scale_off = block * stride_scale_b + in_page * stride_scale_t + kv_head * stride_scale_h
            s = s * tl.load(k_scale_ptr + scale_off, mask=n_ok, other=0.0)[None, :]
        if HAS_SOFT_CAP:
            s = soft_cap * _tanh(s * (sm_scale / soft_cap)) * 1.4426950408889634
        else:
            s = s * (sm_scale * 1.4426950408889634)
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                keep = keep & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN from -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SCALE_MODE == 2:
            p = p * tl.load(v_scale_ptr + scale_off, mask=n_ok, other=0.0)[None, :]
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["batch", "num_tokens", "window"])
def _paged_prefill_kernel(
    q_ptr,                               # [num_tokens, q_heads, head_dim]
    k_cache_ptr, v_cache_ptr,            # [num_blocks, block_size, kv_heads, head_dim]
    k_scale_ptr, v_scale_ptr,            # fp8: [kv_heads] or [num_blocks, block_size, kv_heads] float32
    sinks_ptr,                           # HAS_SINKS: [q_heads] float32 (natural-log logits)
    block_table_ptr,                     # [batch, max_blocks] int32/int64
    query_start_loc_ptr,                 # [batch + 1] int32/int64
    seq_lens_ptr,                        # [batch] int32/int64
    out_ptr,                             # [num_tokens, q_heads, head_dim] q dtype
    sm_scale, soft_cap, window, batch, num_tokens, num_blocks, max_blocks,
    stride_sinks,
    stride_q_t, stride_q_h,
    stride_bt_b,
    stride_cache_b, stride_cache_t, stride_cache_h,
    stride_scale_b, stride_scale_t, stride_scale_h,
    stride_out_t, stride_out_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SCALE_MODE: tl.constexpr,            # 0 none, 1 per head, 2 per token and head
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_FP32: tl.constexpr,              # fp32 operands, IEEE dot (fp32 caches; the interpreter)
    ROUND_BITS: tl.constexpr,            # interpreter only: mantissa bits of the output store
    PAGE_PER_TILE: tl.constexpr,         # BLOCK_N divides BLOCK_SIZE: one block id per key tile
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = _find_sequence(query_start_loc_ptr, tile, batch, BLOCK_Q)
    q_start_raw = tl.load(query_start_loc_ptr + b)
    q_tile = tile - (q_start_raw // BLOCK_Q + b)
    q_start = tl.minimum(tl.maximum(q_start_raw, 0), num_tokens)
    q_end = tl.minimum(tl.maximum(tl.load(query_start_loc_ptr + b + 1), q_start), num_tokens)
    q_len = q_end - q_start
    if (q_tile < 0) | (q_tile * BLOCK_Q >= q_len):
        return
    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + b), 0), max_blocks * BLOCK_SIZE)
    context = seq_len - q_len                       # positions before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + offs_m // GROUP_PAD    # token within the sequence's new tokens
    head_in_group = offs_m % GROUP_PAD
    row_ok = (tok < q_len) & (head_in_group < GROUP)
    heads = kv_head * GROUP + head_in_group
    q_pos = context + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink is the softmax's first column: m = sink (log2 units), l = 1
        m_i = tl.load(sinks_ptr + heads * stride_sinks, mask=row_ok, other=0.0) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # keys the tile reads: [key_lo, key_hi); those every valid row reads in full: tiles [full_lo, full_hi)
    first_pos = context + q_tile * BLOCK_Q
    last_pos = context + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    key_hi = seq_len
    full_hi = seq_len // BLOCK_N
    if CAUSAL:
        key_hi = tl.minimum(last_pos + 1, seq_len)
        full_hi = tl.minimum(tl.maximum(first_pos + 1, 0) // BLOCK_N, full_hi)
    key_lo = 0
    full_lo = 0
    if HAS_WINDOW:
        key_lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N)
    tile_lo = key_lo // BLOCK_N
    tile_hi = tl.cdiv(tl.maximum(key_hi, 0), BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, tile_lo), tile_hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), tile_hi)

    if SCALE_MODE == 1:  # a per-head k scale multiplies every score: fold it into sm_scale
        sm_scale = sm_scale * tl.load(k_scale_ptr + kv_head * stride_scale_h)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt_b
    # window edge (masked), the tiles every row reads in full (no mask), the causal diagonal (masked)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row,
        tile_lo, full_lo, key_lo, seq_len, q_pos, num_blocks, sm_scale, soft_cap, window, kv_head,
        stride_cache_b, stride_cache_t, stride_cache_h, stride_scale_b, stride_scale_t, stride_scale_h,
        offs_d, d_ok, True, CAUSAL, HAS_WINDOW, HAS_SOFT_CAP, SCALE_MODE, DOT_FP32, HEAD_DIM,
        BLOCK_SIZE, PAGE_PER_TILE, BLOCK_N, BLOCK_D)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row,
        full_lo, full_hi, key_lo, seq_len, q_pos, num_blocks, sm_scale, soft_cap, window, kv_head,
        stride_cache_b, stride_cache_t, stride_cache_h, stride_scale_b, stride_scale_t, stride_scale_h,
        offs_d, d_ok, False, CAUSAL, HAS_WINDOW, HAS_SOFT_CAP, SCALE_MODE, DOT_FP32, HEAD_DIM,
        BLOCK_SIZE, PAGE_PER_TILE, BLOCK_N, BLOCK_D)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, bt_row,
        full_hi, tile_hi, key_lo, seq_len, q_pos, num_blocks, sm_scale, soft_cap, window, kv_head,
        stride_cache_b, stride_cache_t, stride_cache_h, stride_scale_b, stride_scale_t, stride_scale_h,
        offs_d, d_ok, True, CAUSAL, HAS_WINDOW, HAS_SOFT_CAP, SCALE_MODE, DOT_FP32, HEAD_DIM,
        BLOCK_SIZE, PAGE_PER_TILE, BLOCK_N, BLOCK_D)
    if SCALE_MODE == 1:
        acc = acc * tl.load(v_scale_ptr + kv_head * stride_scale_h)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that read nothing (and no sink): zeros
    if ROUND_BITS != 0:
        o = round_mantissa(o, ROUND_BITS)
    out_off = q_rows[:, None] * stride_out_t + heads[:, None] * stride_out_h + offs_d[None, :]
    tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _tile_config(head_dim: int, group: int, element_size: int, tokens_per_seq: int):
    """``(GROUP_PAD, BLOCK_Q, BLOCK_N, num_warps, num_stages)`` of a launch.

    128 query rows (tokens x the padded GQA group) by 64 keys at head_dim <= 128 in 16-bit dtypes, as
    FlashAttention-2's forward on Hopper-class GPUs: Q (32 KB at bf16/128) stays in registers across the
    key loop, K and V tiles (16 KB each) double-buffer through shared memory. head_dim 256 or float32
    halves both tile sides to stay within registers and shared memory. A batch whose sequences average
    few new tokens (decode rows in a mixed batch) gets fewer token rows per tile, at least 16 rows in all
    (``tl.dot``'s minimum), so a 1-token row does not pay for 128.
    """
    block_d = triton.next_power_of_2(head_dim)
    group_pad = triton.next_power_of_2(group)
    wide = block_d * element_size > 256  # head_dim 256 at 16 bits, or >= 128 at 32 bits
    block_m = 64 if wide else 128
    block_q = max(1, block_m // group_pad, 16 // group_pad)
    block_q = min(block_q, max(triton.next_power_of_2(max(tokens_per_seq, 1)), 16 // group_pad, 1))
    block_n = 32 if wide else 64
    num_warps = 8 if block_q * group_pad >= 128 or block_d >= 256 else 4
    return group_pad, block_q, block_n, num_warps, 2


class PrefillPlan(NamedTuple):
    """Everything of a paged prefill launch that depends only on shapes, strides, dtypes and the options."""
    block_q: int
    num_stages: int
    config_key: tuple
    static_args: tuple                   # the scalars and strides after ``out_ptr``
    constexprs: dict


def plan_prefill(q, k_cache, v_cache, block_table, seq_lens, scale, causal, sliding_window, logit_soft_cap,
                 k_scale, v_scale, sinks, out=None) -> PrefillPlan:
    """The launch configuration of one paged prefill call (no allocation, no launch); ``out`` None: a new
    contiguous output."""
    num_tokens, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    group = q_heads // kv_heads
    tokens_per_seq = -(-num_tokens // max(batch, 1))
    group_pad, block_q, block_n, num_warps, num_stages = _tile_config(
        head_dim, group, max(q.element_size(), k_cache.element_size()), tokens_per_seq)
    scale_mode, _, _, scale_strides = scale_launch_args(k_cache, v_cache, k_scale, v_scale)
    # triton 3.6's interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584): use fp32 there.
    dot_fp32 = q.dtype == torch.float32 or interpreting()
    has_sinks = sinks is not None
    static_args = (float(scale), float(logit_soft_cap or 0.0), int(sliding_window or 0), batch, num_tokens,
                   num_blocks, block_table.shape[1], sinks.stride(0) if has_sinks else 0,
                   q.stride(0), q.stride(1), block_table.stride(0),
                   k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
                   *((q_heads * head_dim, head_dim) if out is None else (out.stride(0), out.stride(1))))
    constexprs = dict(
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, SCALE_MODE=scale_mode, CAUSAL=bool(causal),
        HAS_WINDOW=bool(sliding_window), HAS_SOFT_CAP=bool(logit_soft_cap), HAS_SINKS=has_sinks,
        DOT_FP32=dot_fp32, ROUND_BITS=round_bits(q.dtype, interpreting()),
        PAGE_PER_TILE=block_size % block_n == 0, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=num_warps)
    config_key = ("prefill", q.dtype, k_cache.dtype, head_dim, group, block_q, scale_mode, has_sinks)
    return PrefillPlan(block_q, num_stages, config_key, static_args, constexprs)


def launch_prefill(plan: PrefillPlan, q, k_cache, v_cache, block_table, query_start_loc, seq_lens, k_scale,
                   v_scale, sinks, out):
    """Run a planned paged prefill into ``out [num_tokens, q_heads, head_dim]``: one launch."""
    num_tokens = q.shape[0]
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    if k_scale is None:  # not fp8: the caches stand in for the unread scale pointers
        k_scale, v_scale = k_cache, v_cache
    sinks_arg = q if sinks is None else sinks  # q: an unread stand-in
    grid = (num_tokens // plan.block_q + batch, k_cache.shape[2])
    _launch_with_stage_fallback(
        _paged_prefill_kernel, grid, plan.config_key, plan.num_stages,
        q, k_cache, v_cache, k_scale, v_scale, sinks_arg, block_table, query_start_loc, seq_lens, out,
        *plan.static_args, **plan.constexprs)
    return out


def paged_prefill_triton(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal=True,
                         sliding_window=None, logit_soft_cap=None, k_scale=None, v_scale=None, sinks=None,
                         out=None, plan=None):
    """Plan and launch the paged prefill kernel; arguments as :func:`kvpool.kernels.paged_prefill` (checked).

    ``plan``: the :func:`plan_prefill` of these arguments (remembered by the public wrapper)."""
    if plan is None:
        plan = plan_prefill(q, k_cache, v_cache, block_table, seq_lens, scale, causal, sliding_window,
                            logit_soft_cap, k_scale, v_scale, sinks, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return launch_prefill(plan, q, k_cache, v_cache, block_table, query_start_loc, seq_lens, k_scale, v_scale,
                          sinks, out)


__all__ = ["PrefillPlan", "launch_prefill", "paged_prefill_triton", "plan_prefill"]
