"""Torch references of the kernels: the definition the Triton kernels are tested against.

They are also the CPU backend (``KVPOOL_KERNELS=torch`` or CPU tensors), and `prefill_attention_reference`
is the backend of :func:`kvpool.kernels.prefill_attention` everywhere. Math runs in float32
(``compute_dtype`` lets the tests ask for float64). Shapes and dtypes are those of the public
functions in :mod:`kvpool.kernels`; the arguments are assumed checked already.

Attention sinks (gpt-oss): one learned logit per query head joins each softmax's denominator as an
extra column that carries no value, so ``out = sum_t exp(s_t) v_t / (exp(sink) + sum_t exp(s_t))``;
a sink of ``-inf`` is no sink. The sink is not scaled and not soft-capped (it is already a logit).
"""
from __future__ import annotations

import torch

from .backend import FP8_DTYPE, FP8_MAX


def _slots_to_pages(slot_mapping: torch.Tensor, block_size: int):
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].to(torch.int64)
    return valid, slots // block_size, slots % block_size


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to +-448 and rounded to float8_e4m3fn; a zero scale gives zeros.

    ``x`` float ``[..., head_dim]``, ``scale`` float32 broadcastable to ``x[..., 0]``.
    """
    scale = scale.to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x.to(torch.float32) / safe[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def write_kv_reference(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Write ``key``/``value`` ``[num_tokens, kv_heads, head_dim]`` into their slots (in place).

    Slot -1 skips the token. fp8 caches: per-head scales ``[kv_heads]`` are read; per token and head
    scales ``[num_blocks, block_size, kv_heads]`` are computed (amax / 448) and stored.
    """
    block_size = k_cache.shape[1]
    valid, blocks, offsets = _slots_to_pages(slot_mapping, block_size)
    for new, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        rows = new[valid]
        if cache.dtype != FP8_DTYPE:
            cache[blocks, offsets] = rows.to(cache.dtype)
        elif scale.dim() == 1:
            cache[blocks, offsets] = quantize_fp8(rows, scale[None, :].expand(rows.shape[:2]))
        else:
            token_scale = rows.to(torch.float32).abs().amax(dim=-1) / FP8_MAX
            scale[blocks, offsets] = token_scale
            cache[blocks, offsets] = quantize_fp8(rows, token_scale)


def _dequantized_pages(cache, scale, block_table, dtype):
    """``cache[block_table]`` as ``[batch, max_blocks * block_size, kv_heads, head_dim]`` in ``dtype``."""
    ids = block_table.to(torch.int64).clamp(0, cache.shape[0] - 1)  # padding ids are masked later
    batch, max_blocks = ids.shape
    pages = cache[ids].to(dtype)
    if scale is not None:
        if scale.dim() == 1:
            pages = pages * scale.to(dtype)[:, None]
        else:
            pages = pages * scale[ids].to(dtype)[..., None]
    return pages.reshape(batch, max_blocks * cache.shape[1], cache.shape[2], cache.shape[3])


def gather_kv_reference(k_cache, v_cache, block_table, seq_lens, k_scale=None, v_scale=None, out_dtype=None):
    """Pages to packed varlen K and V.

    Returns
    -------
    k, v : ``[sum(seq_lens), kv_heads, head_dim]`` ``out_dtype`` (default: the cache dtype, bf16 for fp8)
    cu_seqlens : ``[batch + 1]`` int32, ``cu_seqlens[i]`` = first row of sequence ``i``
    """
    if out_dtype is None:
        out_dtype = torch.bfloat16 if k_cache.dtype == FP8_DTYPE else k_cache.dtype
    lens = seq_lens.to(torch.int64).tolist()
    outs = []
    for cache, scale in ((k_cache, k_scale), (v_cache, v_scale)):
        pages = _dequantized_pages(cache, scale, block_table, torch.float32)
        outs.append(torch.cat([pages[b, :n] for b, n in enumerate(lens)], dim=0).to(out_dtype)
                    if lens else pages.new_empty((0,) + tuple(cache.shape[2:]), dtype=out_dtype))
    cu_seqlens = torch.zeros(len(lens) + 1, dtype=torch.int32, device=seq_lens.device)
    cu_seqlens[1:] = torch.cumsum(seq_lens.to(torch.int64), 0).to(torch.int32)
    return outs[0], outs[1], cu_seqlens


def copy_blocks_reference(caches, src, dst) -> None:
    """``t[dst[i]] = t[src[i]]`` for every tensor ``t`` in ``caches`` (in place)."""
    src = src.to(torch.int64)
    dst = dst.to(torch.int64)
    for t in caches:
        t[dst] = t[src].clone()


def softmax_with_sinks(scores: torch.Tensor, sinks) -> torch.Tensor:
    """Softmax over the last dim of ``scores`` (``-inf`` = masked), with an optional sink column.

    ``sinks`` (or None) broadcasts to ``scores[..., :1]``; it joins the denominator and is dropped from the
    result. A row with every score masked and no sink gives zeros (not NaN).
    """
    if sinks is not None:
        logits = torch.cat([scores, sinks.to(scores.dtype).expand(scores.shape[:-1] + (1,))], dim=-1)
        return torch.softmax(logits, dim=-1)[..., :-1].nan_to_num(0.0)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def paged_decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window=None,
                           logit_soft_cap=None, k_scale=None, v_scale=None, compute_dtype=torch.float32,
                           sinks=None):
    """One query token per sequence against its pages.

    Parameters
    ----------
    q : ``[batch, q_heads, head_dim]``
    k_cache, v_cache : ``[num_blocks, block_size, kv_heads, head_dim]``
    block_table : ``[batch, max_blocks]`` int32
    seq_lens : ``[batch]`` int32 (0 gives a zero output row)
    scale : float, multiplies ``q . k``
    sliding_window : int or None; attend to the last ``sliding_window`` tokens (the query's own included)
    logit_soft_cap : float or None; scores become ``c * tanh(scores / c)`` before the softmax
    sinks : ``[q_heads]`` float32 or None; each q head's sink logit (see the module's docstring)

    Returns
    -------
    ``[batch, q_heads, head_dim]`` in ``q.dtype``
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    keys = _dequantized_pages(k_cache, k_scale, block_table, compute_dtype)   # [b, n, h, d]
    values = _dequantized_pages(v_cache, v_scale, block_table, compute_dtype)
    qg = q.to(compute_dtype).reshape(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, keys) * scale
    if logit_soft_cap:
        scores = logit_soft_cap * torch.tanh(scores / logit_soft_cap)
    pos = torch.arange(keys.shape[1], device=q.device)[None, :]
    lens = seq_lens.to(torch.int64)[:, None]
    keep = pos < lens
    if sliding_window:
        keep &= pos >= lens - sliding_window
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    head_sinks = None if sinks is None else sinks.to(compute_dtype).reshape(1, kv_heads, group, 1)
    probs = softmax_with_sinks(scores, head_sinks)  # seq_len 0: all -inf -> zeros
    out = torch.einsum("bhgn,bnhd->bhgd", probs, values)
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def prefill_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, sliding_window=None,
                                logit_soft_cap=None, sinks=None, compute_dtype=torch.float32):
    """Causal attention of each sequence's new tokens over its packed K/V (e.g. `gather_kv`'s output).

    Sequence ``b`` has ``n_k = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` keys at positions ``0 .. n_k - 1``
    and its ``n_q <= n_k`` queries are the LAST ones, at positions ``n_k - n_q .. n_k - 1`` (a cached
    prefix, then this step's tokens). The query at position ``p`` reads keys ``t <= p`` and, with a window
    ``W``, ``t >= p - W + 1`` (the query's own token included, as `paged_decode`).

    >>> # a 10-token prompt whose first 8 tokens were cached: n_k = 10, n_q = 2 at positions 8 and 9
    >>> # W = 4: the query at 9 reads keys 6, 7, 8, 9

    Parameters
    ----------
    q : ``[total_q, q_heads, head_dim]`` float
    k, v : ``[total_k, kv_heads, head_dim]`` float; q head ``j`` reads KV head ``j // (q_heads // kv_heads)``
    cu_seqlens_q, cu_seqlens_k : ``[batch + 1]`` int32/int64, cumulative query / key counts from 0
    scale : float, multiplies ``q . k``
    sliding_window, logit_soft_cap, sinks : as `paged_decode_reference`

    Returns
    -------
    ``[total_q, q_heads, head_dim]`` in ``q.dtype``
    """
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    head_sinks = None if sinks is None else sinks.to(compute_dtype).reshape(kv_heads, group, 1, 1)
    cq, ck = cu_seqlens_q.to(torch.int64).tolist(), cu_seqlens_k.to(torch.int64).tolist()
    for (q0, q1), (k0, k1) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        n_q, n_k = q1 - q0, k1 - k0
        if n_q == 0:
            continue
        qs = q[q0:q1].to(compute_dtype).reshape(n_q, kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qs, k[k0:k1].to(compute_dtype)) * scale
        if logit_soft_cap:
            scores = logit_soft_cap * torch.tanh(scores / logit_soft_cap)
        q_pos = torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
        k_pos = torch.arange(n_k, device=q.device)[None, :]
        keep = k_pos <= q_pos
        if sliding_window:
            keep &= k_pos > q_pos - sliding_window
        probs = softmax_with_sinks(scores.masked_fill(~keep, float("-inf")), head_sinks)
        rows = torch.einsum("hgqk,khd->qhgd", probs, v[k0:k1].to(compute_dtype))
        out[q0:q1] = rows.reshape(n_q, q_heads, head_dim)
    return out.to(q.dtype)


def _staged_columns(tensors):
    """``(tensor, first byte, last byte)`` of each tensor's row inside a staged block, ``tensors`` order."""
    cols, start = [], 0
    for t in tensors:
        width = t[0].numel() * t.element_size()
        cols.append((t, start, start + width))
        start += width
    return cols


def stage_blocks_reference(tensors, block_ids, staging) -> None:
    """``staging[j]`` = the bytes of ``t[block_ids[j]]`` of every tensor, back to back (``tensors`` order)."""
    ids = block_ids.to(device=staging.device, dtype=torch.int64)
    for t, lo, hi in _staged_columns(tensors):
        staging[:ids.numel(), lo:hi] = t[ids].reshape(ids.numel(), -1).view(torch.uint8)


def unstage_blocks_reference(staging, tensors, block_ids) -> None:
    """``t[block_ids[j]]`` = its bytes in ``staging[j]`` for every tensor (the inverse of the gather)."""
    ids = block_ids.to(device=staging.device, dtype=torch.int64)
    for t, lo, hi in _staged_columns(tensors):
        rows = staging[:ids.numel(), lo:hi].contiguous().view(t.dtype)
        t[ids] = rows.view(ids.numel(), *t.shape[1:])


def _sequence_pages(cache, scale, table_row, first: int, end: int, block_size: int, dtype):
    """Positions ``first .. end - 1`` of one sequence read from its pages: ``[end - first, kv_heads, head_dim]``."""
    pos = torch.arange(first, end, device=cache.device)
    blocks = table_row.to(torch.int64)[pos // block_size]
    rows = cache[blocks, pos % block_size].to(dtype)
    if scale is not None:
        rows = rows * (scale.to(dtype)[None, :, None] if scale.dim() == 1
                       else scale[blocks, pos % block_size].to(dtype)[..., None])
    return rows


def paged_prefill_reference(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal=True,
                            sliding_window=None, logit_soft_cap=None, k_scale=None, v_scale=None, sinks=None,
                            compute_dtype=torch.float32):
    """Attention of each sequence's new tokens over its pages (cached prefix + the new tokens themselves).

    Sequence ``b``'s ``n_q = query_start_loc[b+1] - query_start_loc[b]`` queries are its LAST ``n_q``
    positions of ``seq_lens[b]``: rows ``query_start_loc[b]:query_start_loc[b+1]`` of ``q``, at positions
    ``seq_lens[b] - n_q .. seq_lens[b] - 1``. The query at position ``p`` reads keys ``t <= p`` (every key
    ``t < seq_lens[b]`` when not ``causal``) and, with a window ``W``, only ``t >= p - W + 1``. Only the
    positions some query reads are looked up in the table (a windowed group's released blocks never are).

    >>> # 45 = 40 cached + 5 new: the query rows sit at positions 40..44; W = 8: the one at 44 reads 37..44

    Parameters
    ----------
    q : ``[num_new_tokens, q_heads, head_dim]`` float
    k_cache, v_cache : ``[num_blocks, block_size, kv_heads, head_dim]``
    block_table : ``[batch, max_blocks]`` int32/int64
    query_start_loc : ``[batch + 1]`` int32/int64, cumulative new-token counts from 0
    seq_lens : ``[batch]`` int32/int64, tokens per sequence after this step (``>= n_q``)
    scale, sliding_window, logit_soft_cap, k_scale, v_scale, sinks : as `paged_decode_reference`
    causal : bool, ``False``: every query reads all ``seq_lens[b]`` keys (no window then)

    Returns
    -------
    ``[num_new_tokens, q_heads, head_dim]`` in ``q.dtype``
    """
    q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    head_sinks = None if sinks is None else sinks.to(compute_dtype).reshape(kv_heads, group, 1, 1)
    starts, lens = query_start_loc.to(torch.int64).tolist(), seq_lens.to(torch.int64).tolist()
    for b, n_k in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        first_q = n_k - (q1 - q0)
        first = max(0, first_q - sliding_window + 1) if sliding_window else 0
        keys = _sequence_pages(k_cache, k_scale, block_table[b], first, n_k, block_size, compute_dtype)
        values = _sequence_pages(v_cache, v_scale, block_table[b], first, n_k, block_size, compute_dtype)
        qs = q[q0:q1].to(compute_dtype).reshape(q1 - q0, kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qs, keys) * scale
        if logit_soft_cap:
            scores = logit_soft_cap * torch.tanh(scores / logit_soft_cap)
        q_pos = torch.arange(first_q, n_k, device=q.device)[:, None]
        k_pos = torch.arange(first, n_k, device=q.device)[None, :]
        keep = (k_pos <= q_pos) if causal else torch.ones_like(k_pos <= q_pos)
        if sliding_window:
            keep &= k_pos > q_pos - sliding_window
        probs = softmax_with_sinks(scores.masked_fill(~keep, float("-inf")), head_sinks)
        out[q0:q1] = torch.einsum("hgqk,khd->qhgd", probs, values).reshape(q1 - q0, q_heads, head_dim)
    return out.to(q.dtype)
