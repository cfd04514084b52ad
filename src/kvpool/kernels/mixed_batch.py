"""The public entry point :func:`paged_attention`: one attention call per layer for any batch.

A chunked-prefill server's step mixes prefill chunks (many new tokens per sequence) and decode rows (one).
The split is decided from shapes alone, never from the lengths on the device (no sync, CUDA-graph
friendly):

- ``num_new_tokens == batch``: every row is one token, a decode step. It runs the split-K decode kernel
  (:func:`paged_decode`): with few sequences and long contexts the batch alone does not fill the GPU, and
  splitting each sequence's keys over several programs is what keeps the SMs busy.
- otherwise: ONE launch of the tiled prefill kernel (:func:`paged_prefill`) over every row. A decode row is
  a query tile with one token: one program per KV head streaming that sequence's pages, the GQA group
  packed in the tile's rows. Decode rows are memory-bound, so the tile's idle rows cost tensor-core cycles
  the page loads hide, and the prefill chunks beside them already give the launch its parallelism. The
  tile height shrinks with the batch's average new tokens per sequence (a decode-heavy batch gets 16-row
  tiles). Routing rows to two launches instead would need the per-row lengths on the host.
"""
from __future__ import annotations

import torch

from ..errors import KernelError
from . import prefill_api as _prefill
from . import prefill_checks as _pchk
from .api import _attention_scalars, paged_decode


def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, *, causal=True,
                    sliding_window=None, logit_soft_cap=None, k_scale=None, v_scale=None, out=None, sinks=None):
    """Attention for a batch of prefill chunks and decode rows together; arguments as :func:`paged_prefill`.

    >>> # 2 prefill chunks of 5 and 3 tokens, then 4 decode rows: query_start_loc [0, 5, 8, 9, 10, 11, 12]
    >>> # 12 new tokens for 6 sequences: one tiled launch (a decode-only step, 4 tokens for 4, runs paged_decode)

    Parameters
    ----------
    q : torch.Tensor
        ``[num_new_tokens, q_heads, head_dim]``: every sequence's new tokens, prefills and decodes in any order.
    k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal, sliding_window, logit_soft_cap,
    k_scale, v_scale, out, sinks
        As :func:`paged_prefill`. When ``num_new_tokens == batch`` (a decode step) ``query_start_loc`` must be
        ``0, 1, ..., batch`` (checked on CPU tensors and with ``KVPOOL_DEBUG=1``): a batch with a sequence
        of no new tokens goes through :func:`paged_prefill`.

    Returns
    -------
    torch.Tensor
        ``[num_new_tokens, q_heads, head_dim]`` in ``q.dtype`` (``out`` when given).
    """
    if torch.compiler.is_compiling():
        scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
        args = (q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal, sliding_window,
                logit_soft_cap, k_scale, v_scale, sinks)
        if out is None:
            return torch.ops.kvpool.paged_attention(*args)
        torch.ops.kvpool.paged_attention_out(*args, out)
        return out
    options = {"causal": causal, "sliding_window": sliding_window, "logit_soft_cap": logit_soft_cap,
               "k_scale": k_scale, "v_scale": v_scale, "out": out, "sinks": sinks}
    if not _is_decode_step(q, seq_lens):
        return _prefill.paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, **options)
    _pchk.check_batch_layout(q, block_table, query_start_loc, seq_lens)
    _pchk.check_causal(causal, sliding_window)
    if _pchk.values_checkable(query_start_loc):
        _check_one_token_each(query_start_loc)
    return paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, logit_soft_cap,
                        k_scale, v_scale, sinks=sinks, out=out)


def _is_decode_step(q, seq_lens) -> bool:
    """One new token per sequence, from shapes alone (a non-tensor argument goes the checked prefill way)."""
    return (isinstance(q, torch.Tensor) and isinstance(seq_lens, torch.Tensor) and q.dim() == 3
            and seq_lens.dim() == 1 and q.shape[0] == seq_lens.shape[0] > 0)


def _check_one_token_each(query_start_loc) -> None:
    starts = query_start_loc.to(torch.int64).cpu()
    if not torch.equal(starts, torch.arange(starts.shape[0])):
        raise KernelError(f"query_start_loc={starts.tolist()}: a batch with as many new tokens as sequences is a "
                          "decode step and needs 0, 1, ..., batch; for sequences with no new tokens beside longer "
                          "chunks call paged_prefill")


__all__ = ["paged_attention"]
