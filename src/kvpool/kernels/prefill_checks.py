"""Argument checks of :func:`kvpool.kernels.paged_prefill` and :func:`kvpool.kernels.paged_attention`.

Metadata checks (shapes, dtypes, devices, strides, scalars) always run and cost no device sync; the
value checks (``query_start_loc`` / ``seq_lens`` consistency, block ids in range) read the index
tensors, so they run where that is free (CPU tensors) or with ``KVPOOL_DEBUG=1``. The kernel clamps
every index it reads, so unchecked wrong values give wrong rows, never an out-of-bounds access.
"""
from __future__ import annotations

import torch

from ..errors import BlockIndexError, KernelError
from . import backend as _b


def check_queries(q, k_cache) -> None:
    """``q [num_new_tokens, q_heads, head_dim]`` fitting the pages (head_dim, a multiple of kv_heads, dtype)."""
    _, _, kv_heads, head_dim = k_cache.shape
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise KernelError(f"q must be [num_new_tokens, q_heads, head_dim], got "
                          f"{tuple(getattr(q, 'shape', ())) or type(q).__name__}")
    if q.shape[2] != head_dim or q.shape[1] == 0 or q.shape[1] % kv_heads:
        raise KernelError(f"q shape {tuple(q.shape)} does not fit the cache: head_dim must be {head_dim} and "
                          f"q_heads a positive multiple of kv_heads={kv_heads}")
    if q.dtype not in _b.COMPUTE_DTYPES:
        raise KernelError(f"q dtype {q.dtype} is not supported: use float32, float16 or bfloat16")
    if k_cache.dtype != _b.FP8_DTYPE and q.dtype != k_cache.dtype:
        raise KernelError(f"q is {q.dtype} but the cache is {k_cache.dtype}: cast q to the cache dtype")
    if q.numel() and q.stride(-1) != 1:
        raise KernelError(f"q must be contiguous along head_dim, got strides {q.stride()}")


def check_batch_layout(q, block_table, query_start_loc, seq_lens) -> None:
    """``query_start_loc [batch + 1]`` beside ``block_table [batch, max_blocks]`` and ``seq_lens [batch]``."""
    _b.check_index("block_table", block_table, 2)
    _b.check_index("seq_lens", seq_lens, 1)
    _b.check_index("query_start_loc", query_start_loc, 1)
    batch = seq_lens.shape[0]
    if block_table.shape[0] != batch:
        raise KernelError(f"block_table has {block_table.shape[0]} rows but seq_lens has {batch}: one row per "
                          "sequence")
    if query_start_loc.shape[0] != batch + 1:
        raise KernelError(f"query_start_loc has {query_start_loc.shape[0]} offsets for {batch} sequences: it must "
                          f"hold batch + 1 = {batch + 1} (0, then each sequence's cumulative new-token count)")
    if batch and block_table.shape[1] == 0:
        raise KernelError("block_table has 0 columns: give each sequence room for its blocks")


def check_out(out, q) -> None:
    """``out``: None or a ``q``-shaped, ``q``-dtype tensor on ``q``'s device, head_dim contiguous, writable."""
    if out is None:
        return
    if (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
            or out.device != q.device or (out.numel() and out.stride(-1) != 1)):
        raise KernelError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, head_dim contiguous")
    if any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride())):
        raise KernelError(f"out is written but has stride 0 on a dimension of size > 1 (strides {out.stride()}): "
                          "pass a tensor whose elements own their memory")


def check_causal(causal, sliding_window) -> bool:
    """``causal`` a bool; a window needs causal attention (its lower edge is relative to each query)."""
    if not isinstance(causal, bool):
        raise KernelError(f"causal must be True or False, got {causal!r}")
    if not causal and sliding_window is not None:
        raise KernelError(f"sliding_window={sliding_window} needs causal=True: a window bounds the keys before "
                          "each query; drop the window for bidirectional attention")
    return causal


def check_values(q, block_table, query_start_loc, seq_lens, num_blocks: int, block_size: int,
                 sliding_window) -> None:
    """The index VALUES: offsets from 0 to ``num_new_tokens`` never decreasing, ``n_q <= seq_len <= table
    capacity`` per sequence, and the block ids of every position some query reads in ``[0, num_blocks)``."""
    num_tokens = q.shape[0]
    starts = query_start_loc.to(torch.int64).cpu()
    lens = seq_lens.to(torch.int64).cpu()
    if int(starts[0]) != 0 or int(starts[-1]) != num_tokens or bool((starts[1:] < starts[:-1]).any()):
        raise KernelError(f"query_start_loc={starts.tolist()} must start at 0, never decrease and end at q's "
                          f"{num_tokens} rows (BlockTables' batch.query_start_loc)")
    n_q = starts[1:] - starts[:-1]
    capacity = block_table.shape[1] * block_size
    for b, (new, total) in enumerate(zip(n_q.tolist(), lens.tolist())):
        if not new <= total <= capacity:
            raise BlockIndexError(
                f"sequence {b}: {new} new tokens, seq_lens[{b}]={total}, table capacity {capacity} "
                f"({block_table.shape[1]} blocks of {block_size}): need new tokens <= seq_len <= capacity "
                "(seq_lens counts the cached prefix AND this step's tokens)")
    first = torch.zeros_like(lens)
    if sliding_window:
        first = (lens - n_q - sliding_window + 1).clamp(min=0)
    cols = torch.arange(block_table.shape[1])[None, :]
    used = (cols >= (first // block_size)[:, None]) & (cols < ((lens + block_size - 1) // block_size)[:, None])
    ids = block_table.to(torch.int64).cpu()
    bad = used & ((ids < 0) | (ids >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise BlockIndexError(f"block_table[{b}, {j}]={int(ids[b, j])} is outside [0, {num_blocks}) and sequence "
                              f"{b} reads positions {int(first[b])}..{int(lens[b]) - 1} through it: the table "
                              "names a block the cache lacks")


def values_checkable(*tensors) -> bool:
    """Whether the value checks run: CPU index tensors (no sync), or ``KVPOOL_DEBUG=1``."""
    return _b.debug_checks() or not any(t.is_cuda for t in tensors)


__all__ = ["check_batch_layout", "check_causal", "check_out", "check_queries", "check_values", "values_checkable"]
