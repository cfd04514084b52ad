"""The public entry point :func:`paged_prefill`: check, pick the backend, run.

Triton on CUDA tensors (:mod:`kvpool.kernels.paged_prefill_kernel`, imported on first use), the float32
torch reference (:func:`kvpool.kernels.reference.paged_prefill_reference`) elsewhere, as the other kernels
(:mod:`kvpool.kernels.backend`). A call whose tensors and options come back unchanged skips its metadata
checks and launch planning (:mod:`kvpool.kernels.proof_cache`), as `paged_decode` does.
"""
from __future__ import annotations

import torch

from . import backend as _b
from . import prefill_checks as _pchk
from . import proof_cache as _pc
from . import reference as _ref
from .api import _attention_scalars


def paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, *, causal=True,
                  sliding_window=None, logit_soft_cap=None, k_scale=None, v_scale=None, out=None, sinks=None):
    """Attention of each sequence's new tokens over its pages: the cached prefix and the new tokens.

    Sequence ``i``'s ``q_len_i = query_start_loc[i+1] - query_start_loc[i]`` new tokens are rows
    ``query_start_loc[i]:query_start_loc[i+1]`` of ``q`` and its LAST ``q_len_i`` positions of
    ``seq_lens[i]``; each attends causally to every position before it and to itself, reading K/V straight
    from the pages (no gathered copy). Write the new tokens' K/V first (:func:`write_kv`).

    >>> # a 45-token prompt, 40 tokens a prefix hit: seq_lens [45], query_start_loc [0, 5];
    >>> # the 5 rows of q sit at positions 40..44 (45 - 5 = 40); the one at 44 reads keys 0..44

    Parameters
    ----------
    q : torch.Tensor
        ``[num_new_tokens, q_heads, head_dim]`` float16/bfloat16/float32 (the cache dtype unless the cache
        is fp8), ``head_dim`` contiguous; q head ``j`` reads KV head ``j // (q_heads // kv_heads)``.
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, kv_heads, head_dim]`` (an HND cache as its ``permute(0, 2, 1, 3)`` view).
    block_table : torch.Tensor
        ``[batch, max_blocks]`` int32 (or int64): sequence ``i``'s ``j``-th block id.
    query_start_loc : torch.Tensor
        ``[batch + 1]`` int32 (or int64): 0, then the cumulative new-token counts (``BlockTables``'
        ``batch.query_start_loc``); the last entry is ``num_new_tokens``.
    seq_lens : torch.Tensor
        ``[batch]`` int32 (or int64): tokens of each sequence after this step, its new ones included
        (``>= q_len_i``).
    scale : float
        Multiplies ``q . k`` (usually ``head_dim ** -0.5``).
    causal : bool, default True
        ``False``: every new token reads all ``seq_lens[i]`` positions (bidirectional within the chunk).
    sliding_window : int, optional
        The query at position ``p`` reads keys ``p - sliding_window + 1 .. p`` (as `paged_decode`); needs
        ``causal``. Positions no query reads (a windowed group's released blocks) are never looked up.
    logit_soft_cap : float, optional
        Scores become ``c * tanh(scores / c)`` before the softmax (Gemma-2).
    k_scale, v_scale : torch.Tensor, optional
        fp8 caches: float32 ``[kv_heads]`` (per head; per tensor: ``s.expand(kv_heads)``) or
        ``[num_blocks, block_size, kv_heads]`` (per token and head); pages are dequantized on the fly.
    out : torch.Tensor, optional
        Preallocated ``[num_new_tokens, q_heads, head_dim]`` ``q.dtype`` output, ``head_dim`` contiguous.
    sinks : torch.Tensor, optional
        ``[q_heads]`` float32 attention sinks, as `paged_decode`'s.

    Returns
    -------
    torch.Tensor
        ``[num_new_tokens, q_heads, head_dim]`` in ``q.dtype`` (``out`` when given).

    Raises
    ------
    KernelError
        Shapes, dtypes, devices or options that do not fit; ``query_start_loc`` not running from 0 to
        ``num_new_tokens`` (values checked on CPU tensors, on CUDA with ``KVPOOL_DEBUG=1``).
    BlockIndexError
        ``q_len_i > seq_lens[i]``, ``seq_lens[i]`` past the table's capacity, or a block id read outside
        ``[0, num_blocks)`` (same condition on the checks). Unchecked, the kernel clamps what it reads.
    """
    if torch.compiler.is_compiling():  # one custom op in the graph; it runs this function eagerly
        scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
        args = (q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal, sliding_window,
                logit_soft_cap, k_scale, v_scale, sinks)
        if out is None:
            return torch.ops.kvpool.paged_prefill(*args)
        torch.ops.kvpool.paged_prefill_out(*args, out)
        return out
    tensors = (q, k_cache, v_cache, block_table, query_start_loc, seq_lens, k_scale, v_scale, sinks, out)
    key = _prefill_key(tensors, (scale, causal, sliding_window, logit_soft_cap))
    proof = _PREFILL_PROOFS.get(key) if key is not None else None
    if proof is None:
        proof = check_paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal,
                                    sliding_window, logit_soft_cap, k_scale, v_scale, sinks, out)
        if key is not None:
            _PREFILL_PROOFS.put(key, proof)
    plan, scale, sliding_window, logit_soft_cap = proof
    if plan is not None:
        from .paged_prefill_kernel import paged_prefill_triton
        return paged_prefill_triton(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal,
                                    sliding_window, logit_soft_cap, k_scale, v_scale, sinks, out, plan)
    result = _ref.paged_prefill_reference(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                                          causal, sliding_window, logit_soft_cap, k_scale, v_scale, sinks)
    return result if out is None else out.copy_(result)


_PREFILL_PROOFS = _pc.ProofCache()


def _prefill_key(tensors, scalars) -> tuple | None:
    """The proof-cache key of a call, or ``None``: not cacheable (values checked, odd argument types)."""
    env = _pc.cacheable_env()
    if env is None or not all(t is None or isinstance(t, torch.Tensor) for t in tensors):
        return None
    if tensors[0] is None or not all(t.is_cuda for t in tensors if t is not None):
        return None  # CPU tensors: their values are checked on every call
    if not all(x is None or type(x) in (int, float, bool) for x in scalars):
        return None
    return (*map(_pc.tensor_key, tensors), *((type(x), x) for x in scalars), env)


def check_paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal,
                        sliding_window, logit_soft_cap, k_scale, v_scale, sinks, out) -> tuple:
    """Every check of :func:`paged_prefill`; returns ``(plan or None for the torch path, scale, sliding_window,
    logit_soft_cap)``."""
    _b.check_cache_pair(k_cache, v_cache)
    _b.check_scales(k_cache, k_scale, v_scale)
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    _pchk.check_queries(q, k_cache)
    _pchk.check_batch_layout(q, block_table, query_start_loc, seq_lens)
    _b.same_device({"q": q, "k_cache": k_cache, "block_table": block_table, "query_start_loc": query_start_loc,
                    "seq_lens": seq_lens})
    scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
    _pchk.check_causal(causal, sliding_window)
    _b.check_sinks(sinks, q.shape[1], q.device)
    _pchk.check_out(out, q)
    if _pchk.values_checkable(query_start_loc, seq_lens, block_table):
        _pchk.check_values(q, block_table, query_start_loc, seq_lens, num_blocks, block_size, sliding_window)
    plan = None
    if _b.use_triton(q, k_cache):
        from .paged_prefill_kernel import plan_prefill
        plan = plan_prefill(q, k_cache, v_cache, block_table, seq_lens, scale, causal, sliding_window,
                            logit_soft_cap, k_scale, v_scale, sinks, out)
    return plan, scale, sliding_window, logit_soft_cap


__all__ = ["check_paged_prefill", "paged_prefill"]
