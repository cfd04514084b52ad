"""Triton kernels: paged decode attention (one query token per sequence), flash-decoding style.

Program ``(b * kv_heads + kv_head, split)`` owns one KV head of one sequence and a contiguous run
of its KV tiles. It loads the whole query group of that KV head (``GROUP`` q heads, padded to
``BLOCK_H >= 16`` rows so ``tl.dot`` runs on tensor cores) once, then streams the tiles: a tile is
``BLOCK_N`` consecutive tokens (several pages when pages are small), loaded once and used by every
q head of the group, ``[BLOCK_H, D] x [D, BLOCK_N]`` for the scores and ``[BLOCK_H, BLOCK_N] x
[BLOCK_N, D]`` for the values, with an online softmax in float32 (base 2).

When ``batch * kv_heads`` programs would leave SMs idle, the tiles of a sequence are split over
``num_splits`` programs that write a partial result and its log-sum-exp; a second, tiny kernel
merges them. Otherwise a single pass writes the output directly.

fp8 pages are widened to the query dtype (exact) and their scales folded into the scores
(``k``) and the probabilities / accumulator (``v``), so no float32 copy of a tile is made.

Attention sinks (one logit per q head, no value) start the online softmax of the one-pass kernel
(``m = sink``, ``l = 1``); with splits, the merge adds ``2^sink`` to the denominator instead, so each
sink is counted once.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .backend import interpreting, scale_launch_args
from .interpreter_fixes import round_bits, round_mantissa
from .workspace import cached_workspace


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit(do_not_specialize=["num_splits", "window"])
def _paged_decode_kernel(
    q_ptr,                               # [batch, q_heads, head_dim]
    k_cache_ptr, v_cache_ptr,            # [num_blocks, block_size, kv_heads, head_dim]
    k_scale_ptr, v_scale_ptr,            # fp8: [kv_heads] or [num_blocks, block_size, kv_heads] float32
    sinks_ptr,                           # HAS_SINKS: [q_heads] float32 (natural-log logits)
    block_table_ptr,                     # [batch, max_blocks] int32
    seq_lens_ptr,                        # [batch] int32
    out_ptr,                             # SPLIT: [batch, q_heads, num_splits, head_dim] f32,
                                         # else [batch, q_heads, head_dim] q dtype
    lse_ptr,                             # SPLIT: [batch, q_heads, num_splits] f32 (log2 domain)
    sm_scale, soft_cap, window, num_splits,
    stride_sinks,
    stride_q_b, stride_q_h,
    stride_bt_b,
    stride_cache_b, stride_cache_t, stride_cache_h,
    stride_scale_b, stride_scale_t, stride_scale_h,
    stride_out_b, stride_out_h, stride_out_s,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SCALE_MODE: tl.constexpr,            # 0 none, 1 per head, 2 per token and head
    HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr, SPLIT: tl.constexpr,
    HAS_SINKS: tl.constexpr,             # one pass only (a split launch adds the sinks in the merge)
    DOT_FP32: tl.constexpr,              # fp32 operands, IEEE dot (fp32 caches; the interpreter, see below)
    ROUND_BITS: tl.constexpr,            # interpreter only: mantissa bits of the output store
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV_HEADS
    kv_head = pid % KV_HEADS

    seq_len = tl.load(seq_lens_ptr + b)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    first_tile = start // BLOCK_N
    end_tile = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(end_tile - first_tile, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, end_tile)

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if SCALE_MODE == 1:
        k_head_scale = tl.load(k_scale_ptr + kv_head * stride_scale_h)
        v_head_scale = tl.load(v_scale_ptr + kv_head * stride_scale_h)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp2 instead of exp

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if HAS_SINKS:  # the sink is the softmax's first column: m = sink (log2 units), l = 2^(sink - m) = 1
        m_i = tl.load(sinks_ptr + heads * stride_sinks, mask=h_ok, other=0.0) * 1.4426950408889634
        l_i = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt_b
    head_off = kv_head.to(tl.int64) * stride_cache_h
    for tile in tl.range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < seq_len) & (offs_n >= start)
        block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        in_page = offs_n % BLOCK_SIZE
        row = block * stride_cache_b + in_page * stride_cache_t + head_off
        if BLOCK_D == HEAD_DIM:
            kv_mask = n_ok[:, None]  # constant along head_dim: keeps 16-byte vector loads
        else:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k))
        if SCALE_MODE == 1:
            s = s * k_head_scale
        if SCALE_MODE == 2:
            scale_off = block * stride_scale_b + in_page * stride_scale_t + kv_head * stride_scale_h
            s = s * tl.load(k_scale_ptr + scale_off, mask=n_ok, other=0.0)[None, :]
        if HAS_SOFT_CAP:
            s = soft_cap * _tanh(s * (sm_scale / soft_cap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SCALE_MODE == 2:
            p = p * tl.load(v_scale_ptr + scale_off, mask=n_ok, other=0.0)[None, :]
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SCALE_MODE == 1:
        acc = acc * v_head_scale

    # seq_len 0 (or an empty split): acc = 0 -> a zero row; without a sink l_i = 0 and lse = -inf (the
    # merge ignores it). A sink of -inf: m_i stays -inf until a token arrives (alpha = 0 drops l_i = 1).
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = h_ok[:, None] & d_ok[None, :]
    out_rows = b.to(tl.int64) * stride_out_b + heads * stride_out_h
    if SPLIT:
        out_rows += split * stride_out_s
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], o, mask=out_mask)
        lse_off = (b.to(tl.int64) * KV_HEADS * GROUP + heads) * num_splits + split
        tl.store(lse_ptr + lse_off, m_i + tl.log2(l_i), mask=h_ok)
    else:
        if ROUND_BITS != 0:
            o = round_mantissa(o, ROUND_BITS)
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_ptr,                            # [batch * q_heads, num_splits, head_dim] f32, contiguous
    lse_ptr,                             # [batch * q_heads, num_splits] f32, log2 domain
    sinks_ptr,                           # HAS_SINKS: [q_heads] float32 (natural-log logits)
    out_ptr,                             # [batch, q_heads, head_dim]
    num_splits, stride_sinks, stride_out_b, stride_out_h,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROUND_BITS: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Q_HEADS
    h = pid % Q_HEADS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + pid * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h * stride_sinks) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0), no sink: weights 0, output 0
    w = tl.exp2(lse - m)
    part = tl.load(part_ptr + (pid * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    den = tl.sum(w, axis=0)
    if HAS_SINKS:
        den += tl.exp2(sink - m)  # the sink's column: in the denominator, no value
    o = tl.sum(part * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    if ROUND_BITS != 0:
        o = round_mantissa(o, ROUND_BITS)
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(head_dim: int, element_size: int):
    """(BLOCK_N tokens per tile, num_warps, num_stages).

    64-token tiles (32 KB of bf16 K+V at head_dim 128), 2 stages: the loads go through cp.async
    and the kernel needs ~96 registers a thread and ~39 KB of shared memory at bf16/128, so ~5
    programs fit an SM and 4 x SMs programs are all resident at once (no tail wave). Deeper
    pipelining (3 stages) needs ~168 registers, i.e. 3 programs an SM, for no more bytes in flight.
    fp32 at head_dim 256 uses 32-token tiles to stay within shared memory.
    """
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64 if 2 * 64 * block_d * element_size <= 65536 else 32
    return block_n, (8 if block_d >= 256 else 4), 2


_STAGES_CAP: dict = {}  # kernel config -> num_stages that fit this GPU's shared memory (after OutOfResources)


def _launch_with_stage_fallback(kernel, grid, key, num_stages, *args, **kwargs):
    """Launch; if a config exceeds the GPU's shared memory, retry with fewer pipeline stages (once per key)."""
    stages = min(num_stages, _STAGES_CAP.get(key, num_stages))
    while True:
        try:
            return kernel[grid](*args, num_stages=stages, **kwargs)
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            _STAGES_CAP[key] = stages


def choose_num_splits(batch: int, kv_heads: int, max_tokens: int, block_n: int, num_sms: int) -> int:
    """How many programs share one sequence's tiles.

    One pass (1) once ``batch * kv_heads`` programs fill every SM twice; otherwise enough splits for
    about four programs per SM, each keeping at least two tiles so the merge stays cheap. Uses only
    host-side sizes (no device sync), so the call can be captured in a CUDA graph.
    """
    programs = batch * kv_heads
    if programs == 0 or programs >= 2 * num_sms:
        return 1
    max_tiles = triton.cdiv(max(max_tokens, 1), block_n)
    return max(1, min(triton.cdiv(4 * num_sms, programs), triton.cdiv(max_tiles, 2)))


class DecodePlan(NamedTuple):
    """Everything of a decode launch that depends only on shapes, strides, dtypes and the options."""
    num_splits: int
    num_stages: int
    config_key: tuple
    static_args: tuple                   # scalars and strides between ``num_splits`` and the dest strides
    constexprs: dict
    merge_constexprs: dict


def plan_decode(q, k_cache, v_cache, block_table, scale, sliding_window, logit_soft_cap, k_scale, v_scale,
                sinks, num_splits=None) -> DecodePlan:
    """The launch configuration of one decode call (no allocation, no launch); cacheable by its inputs'
    metadata. ``num_splits`` overrides the heuristic."""
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    block_n, num_warps, num_stages = _tile_config(head_dim, k_cache.element_size())
    if num_splits is None:
        max_tokens = block_table.shape[1] * block_size
        if sliding_window:
            max_tokens = min(max_tokens, sliding_window + block_n)
        num_sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.is_cuda else 4
        num_splits = choose_num_splits(batch, kv_heads, max_tokens, block_n, num_sms)
    scale_mode, _, _, scale_strides = scale_launch_args(k_cache, v_cache, k_scale, v_scale)
    # triton 3.6's interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584): use fp32 there.
    dot_fp32 = q.dtype == torch.float32 or interpreting()
    split = num_splits > 1
    has_sinks = sinks is not None
    static_args = (float(scale), float(logit_soft_cap or 0.0), int(sliding_window or 0), num_splits,
                   sinks.stride(0) if has_sinks else 0,
                   q.stride(0), q.stride(1), block_table.stride(0),
                   k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides)
    round_to = round_bits(q.dtype, interpreting())
    constexprs = dict(
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, SCALE_MODE=scale_mode,
        HAS_WINDOW=bool(sliding_window), HAS_SOFT_CAP=bool(logit_soft_cap), SPLIT=split,
        HAS_SINKS=has_sinks and not split, DOT_FP32=dot_fp32, ROUND_BITS=round_to,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=num_warps)
    merge_constexprs = dict(Q_HEADS=q_heads, HEAD_DIM=head_dim, ROUND_BITS=round_to, HAS_SINKS=has_sinks,
                            BLOCK_S=triton.next_power_of_2(num_splits),
                            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    config_key = (q.dtype, k_cache.dtype, head_dim, group, scale_mode, split, has_sinks)
    return DecodePlan(num_splits, num_stages, config_key, static_args, constexprs, merge_constexprs)


def launch_decode(plan: DecodePlan, q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, sinks, out,
                  workspace=None):
    """Run a planned decode into ``out [batch, q_heads, head_dim]``: one launch without splits, else the
    split kernel into ``workspace``'s scratch (the cached one when ``None``) and the merge."""
    batch, q_heads, head_dim = q.shape
    if batch == 0:
        return out
    kv_heads = k_cache.shape[2]
    if k_scale is None:  # not fp8: the caches stand in for the unread scale pointers
        k_scale, v_scale = k_cache, v_cache
    sinks_arg = q if sinks is None else sinks  # q: an unread stand-in
    num_splits = plan.num_splits
    if num_splits > 1:
        if workspace is None:
            workspace = cached_workspace(q.device)
        part, lse = workspace.split_buffers(batch, q_heads, num_splits, head_dim)
        dest, dest_strides = part, part.stride()[:3]
    else:
        lse, dest, dest_strides = out, out, (out.stride(0), out.stride(1), 0)
    _launch_with_stage_fallback(
        _paged_decode_kernel, (batch * kv_heads, num_splits), plan.config_key, plan.num_stages,
        q, k_cache, v_cache, k_scale, v_scale, sinks_arg, block_table, seq_lens, dest, lse,
        *plan.static_args, *dest_strides, **plan.constexprs)
    if num_splits > 1:
        _merge_splits_kernel[(batch * q_heads,)](
            part, lse, sinks_arg, out, num_splits, plan.static_args[4], out.stride(0), out.stride(1),
            **plan.merge_constexprs)
    return out


def paged_decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window=None,
                        logit_soft_cap=None, k_scale=None, v_scale=None, num_splits=None, out=None, sinks=None,
                        workspace=None, plan=None):
    """Plan and launch the decode kernel (+ merge); arguments as :func:`kvpool.kernels.paged_decode`.

    ``num_splits`` overrides the heuristic (tests use it to cover both paths on CPU); ``plan``, the
    :func:`plan_decode` of these arguments (remembered by the public wrapper), skips the planning.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if plan is None:
        plan = plan_decode(q, k_cache, v_cache, block_table, scale, sliding_window, logit_soft_cap, k_scale,
                           v_scale, sinks, num_splits)
    return launch_decode(plan, q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, sinks, out, workspace)


__all__ = ["DecodePlan", "choose_num_splits", "launch_decode", "paged_decode_triton", "plan_decode"]
