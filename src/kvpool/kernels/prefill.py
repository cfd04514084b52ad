"""Causal prefill attention over packed (gathered) K/V: the checked entry point `prefill_attention`.

The prefill path reads a sequence's pages back with `gather_kv` (cached prefix + this step's tokens) and
attends causally over them, with a sliding window, a soft cap and attention sinks. It runs the torch
reference (`kvpool.kernels.reference.prefill_attention_reference`, float32 math) on every device: there
is no Triton prefill kernel yet. Every argument is checked here, like the Triton kernels' entry points.
"""
from __future__ import annotations

import torch

from ..errors import KernelError
from . import backend as _b
from . import reference as _ref
from .api import _attention_scalars


def _check_packed(q, k, v) -> None:
    """``q [total_q, q_heads, head_dim]``, ``k``/``v`` ``[total_k, kv_heads, head_dim]``, float, one dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise KernelError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                              f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.dtype not in _b.COMPUTE_DTYPES:
            raise KernelError(f"{name} dtype {t.dtype} is not supported: use float32, float16 or bfloat16 "
                              "(gather_kv dequantizes fp8 pages)")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise KernelError(f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must have the same "
                          "shape and dtype")
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise KernelError(f"q shape {tuple(q.shape)} does not fit k {tuple(k.shape)}: head_dim must be "
                          f"{k.shape[2]} and q_heads a multiple of kv_heads={k.shape[1]}")
    if q.dtype != k.dtype:
        raise KernelError(f"q is {q.dtype} but k/v are {k.dtype}: pass gather_kv(..., out_dtype=q.dtype)")


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int) -> None:
    """Both ``[batch + 1]`` from 0, non-decreasing, ending at the row counts; ``n_q <= n_k`` per sequence.

    Reads them on the host (the reference does anyway).
    """
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _b.check_index(name, t, 1)
        if t.shape[0] < 1:
            raise KernelError(f"{name} must hold batch + 1 >= 1 offsets starting at 0, got an empty tensor")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise KernelError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} offsets but cu_seqlens_k has "
                          f"{cu_seqlens_k.shape[0]}: one per sequence boundary in both")
    for name, t, total in (("cu_seqlens_q", cu_seqlens_q, total_q), ("cu_seqlens_k", cu_seqlens_k, total_k)):
        offsets = t.to(torch.int64).tolist()
        steps = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or offsets[-1] != total or min(steps, default=0) < 0:
            raise KernelError(f"{name}={offsets} must start at 0, never decrease and end at the {total} rows of "
                              f"{'q' if name.endswith('q') else 'k/v'}")
    n_q = torch.diff(cu_seqlens_q.to(torch.int64))
    n_k = torch.diff(cu_seqlens_k.to(torch.int64))
    if bool((n_q > n_k.to(n_q.device)).any()):
        b = int((n_q > n_k.to(n_q.device)).nonzero()[0, 0])
        raise KernelError(f"sequence {b} has {int(n_q[b])} queries but {int(n_k[b])} keys: its queries are the "
                          "last tokens of its keys (gather every token, the new ones included)")


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, sliding_window=None, logit_soft_cap=None, *,
                      sinks=None):
    """Causal attention of each sequence's new tokens over its cached prefix + new tokens.

    Sequence ``b``'s keys are rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of ``k``/``v`` (positions ``0 ..
    n_k - 1``, `gather_kv`'s output); its ``n_q <= n_k`` queries are the last ``n_q`` positions.

    >>> # prompt of 40 tokens, 32 cached (a prefix hit): n_k = 40, n_q = 8 at positions 32..39;
    >>> # with sliding_window=16 the query at position 39 reads keys 24..39

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, q_heads, head_dim]`` float32/float16/bfloat16. q head ``j`` reads KV head
        ``j // (q_heads // kv_heads)``.
    k, v : torch.Tensor
        ``[total_k, kv_heads, head_dim]`` in ``q.dtype`` (``gather_kv(..., out_dtype=q.dtype)``).
    cu_seqlens_q, cu_seqlens_k : torch.Tensor
        ``[batch + 1]`` int32/int64 cumulative query and key counts from 0 (``BlockTables``'
        ``query_start_loc``; `gather_kv`'s ``cu_seqlens``).
    scale : float
        Multiplies ``q . k``.
    sliding_window : int, optional
        The query at position ``p`` reads keys ``p - sliding_window + 1 .. p`` (as `paged_decode`).
    logit_soft_cap : float, optional
        Scores become ``c * tanh(scores / c)`` before the softmax.
    sinks : torch.Tensor, optional
        ``[q_heads]`` float32 attention sinks, as `paged_decode`'s.

    Returns
    -------
    torch.Tensor
        ``[total_q, q_heads, head_dim]`` in ``q.dtype``.
    """
    if torch.compiler.is_compiling():  # the kvpool::prefill_attention custom op runs this function eagerly
        scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
        return torch.ops.kvpool.prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, sliding_window,
                                                  logit_soft_cap, sinks)
    _check_packed(q, k, v)
    _b.same_device({"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
    _b.check_sinks(sinks, q.shape[1], q.device)
    return _ref.prefill_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, sliding_window,
                                            logit_soft_cap, sinks)


__all__ = ["prefill_attention"]
