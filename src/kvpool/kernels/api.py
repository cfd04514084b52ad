"""The public kernel entry points: check arguments, pick the backend, run.

Every check here is host-side metadata only (no device sync) unless ``KVPOOL_DEBUG=1``. The Triton
modules are imported on first use, so the torch backend works where Triton is not installed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import KernelError
from . import backend as _b
from . import ops as _ops  # noqa: F401  (registers torch.ops.kvpool.*)
from . import proof_cache as _pc
from . import reference as _ref
from .ids import as_block_ids, check_copy_pairs, exact_int, is_bool
from .workspace import DecodeWorkspace


def _check_new_tokens(key, value, k_cache, slot_mapping) -> None:
    _, block_size, kv_heads, head_dim = k_cache.shape
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise KernelError(f"{name} must be a 3-D tensor [num_tokens, kv_heads, head_dim], got "
                              f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if tuple(t.shape[1:]) != (kv_heads, head_dim):
            raise KernelError(f"{name} shape {tuple(t.shape)} does not fit the cache's (kv_heads, head_dim) = "
                              f"({kv_heads}, {head_dim})")
        if t.dtype not in _b.COMPUTE_DTYPES:
            raise KernelError(f"{name} dtype {t.dtype} is not supported: pass float32, float16 or bfloat16 "
                              "(fp8 quantization happens in the kernel)")
        if t.numel() and t.stride(-1) != 1:
            raise KernelError(f"{name} must be contiguous along head_dim, got strides {t.stride()}")
    if key.shape != value.shape:
        raise KernelError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    _b.check_index("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != key.shape[0]:
        raise KernelError(f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens: one each")


def _check_writable(name: str, t: torch.Tensor) -> None:
    """A tensor a kernel writes: no two elements may share memory (an ``expand``-ed view would race)."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise KernelError(f"{name} is written but has stride 0 on a dimension of size > 1 (shape "
                          f"{tuple(t.shape)}, strides {t.stride()}): pass a tensor whose elements own their "
                          "memory, e.g. .clone() of the expanded view")


def write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Write new tokens' K and V into their cache slots (in place).

    Parameters
    ----------
    key, value : torch.Tensor
        ``[num_tokens, kv_heads, head_dim]`` float32/float16/bfloat16, any strides with ``head_dim``
        contiguous (a slice of a fused QKV output works).
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, kv_heads, head_dim]`` float32/float16/bfloat16/float8_e4m3fn.
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int32 (or int64): ``slot = block_id * block_size + offset``; -1 skips the token.
    k_scale, v_scale : torch.Tensor, optional
        fp8 caches only, float32. ``[kv_heads]``: given per-head scales, ``x / scale`` is stored.
        ``[num_blocks, block_size, kv_heads]``: per token and head, ``amax(|x|) / 448`` is computed
        and stored here for every written token.
    """
    if torch.compiler.is_compiling():  # one custom op in the graph; it runs this function (checks) eagerly
        torch.ops.kvpool.write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    args = (key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    env = _pc.cacheable_env()
    proof_key = None
    if env is not None and all(t is None or isinstance(t, torch.Tensor) for t in args):
        proof_key = (*map(_pc.tensor_key, args), env)
    on_triton = _WRITE_PROOFS.get(proof_key) if proof_key is not None else None
    if on_triton is None:
        on_triton = _check_write_kv(*args)
        if proof_key is not None:
            _WRITE_PROOFS.put(proof_key, on_triton)
    if on_triton:
        from .write import write_kv_triton
        write_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        _ref.write_kv_reference(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


_WRITE_PROOFS = _pc.ProofCache()


def _check_write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> bool:
    """Every check of :func:`write_kv`; returns whether the Triton kernel runs (else the torch reference)."""
    _b.check_cache_pair(k_cache, v_cache)
    _check_new_tokens(key, value, k_cache, slot_mapping)
    _b.check_scales(k_cache, k_scale, v_scale)
    _b.same_device({"key": key, "value": value, "k_cache": k_cache, "slot_mapping": slot_mapping})
    _b.check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    _check_writable("k_cache", k_cache)  # v_cache shares its strides
    if k_scale is not None and k_scale.dim() == 3:  # per-token scales are computed and stored
        _check_writable("k_scale", k_scale)
    return _b.use_triton(key, k_cache)


def gather_kv(k_cache, v_cache, block_table, seq_lens, k_scale=None, v_scale=None, *, out_dtype=None,
              total_tokens=None, out=None):
    """Copy sequences' pages into packed varlen K and V (dequantizing fp8).

    Parameters
    ----------
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, kv_heads, head_dim]``.
    block_table : torch.Tensor
        ``[batch, max_blocks]`` int32: sequence ``b``'s ``j``-th block id.
    seq_lens : torch.Tensor
        ``[batch]`` int32 tokens per sequence.
    k_scale, v_scale : torch.Tensor, optional
        fp8 caches: float32 ``[kv_heads]`` or ``[num_blocks, block_size, kv_heads]``.
    out_dtype : torch.dtype, optional
        Output dtype; default the cache dtype, bfloat16 for fp8 caches.
    total_tokens : int, optional
        ``sum(seq_lens)`` if the caller knows it: saves one device-to-host sync.
    out : tuple of torch.Tensor, optional
        Preallocated contiguous ``(k, v)`` outputs ``[sum(seq_lens), kv_heads, head_dim]`` (no sync either).
        ``total_tokens`` and ``out``'s rows must agree; both are checked against ``sum(seq_lens)`` on CPU
        tensors or with ``KVPOOL_DEBUG=1`` (:class:`KernelError`). On CUDA without it, rows past ``out``
        are dropped, never written.

    Returns
    -------
    k, v : torch.Tensor
        ``[sum(seq_lens), kv_heads, head_dim]`` ``out_dtype``; rows ``cu_seqlens[b]:cu_seqlens[b+1]`` are
        sequence ``b``'s tokens in order.
    cu_seqlens : torch.Tensor
        ``[batch + 1]`` int32, starting at 0.
    """
    if torch.compiler.is_compiling():
        return _gather_kv_op(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out_dtype, total_tokens, out)
    _b.check_cache_pair(k_cache, v_cache)
    _b.check_scales(k_cache, k_scale, v_scale)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    _b.check_block_table(block_table, seq_lens, num_blocks, block_size)
    _b.same_device({"k_cache": k_cache, "block_table": block_table, "seq_lens": seq_lens})
    if out is not None:
        _check_gather_out(out, out_dtype, kv_heads, head_dim, k_cache.device)
        out_dtype = out[0].dtype
    if out_dtype is None:
        out_dtype = torch.bfloat16 if k_cache.dtype == _b.FP8_DTYPE else k_cache.dtype
    if out_dtype not in _b.COMPUTE_DTYPES:
        raise KernelError(f"out_dtype {out_dtype} is not supported: use float32, float16 or bfloat16")
    rows = _gather_rows(seq_lens, total_tokens, out)
    if not _b.use_triton(k_cache, block_table):
        k, v, cu = _ref.gather_kv_reference(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out_dtype)
        if rows is not None and rows != k.shape[0]:  # CUDA tensors forced onto the torch path
            raise KernelError(f"{_rows_source(total_tokens, out)} but sum(seq_lens) is {k.shape[0]}")
        if out is None:
            return k, v, cu
        out[0].copy_(k)
        out[1].copy_(v)
        return out[0], out[1], cu
    from .gather import gather_kv_triton
    cu_seqlens = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
    torch.cumsum(seq_lens, 0, dtype=torch.int32, out=cu_seqlens[1:])
    if out is not None:
        k, v = out
    else:
        total = int(cu_seqlens[-1]) if rows is None else rows
        k = torch.empty((total, kv_heads, head_dim), dtype=out_dtype, device=k_cache.device)
        v = torch.empty_like(k)
    # the kernel drops rows past k's end, so a wrong count unchecked on CUDA never writes out of bounds
    gather_kv_triton(k_cache, v_cache, block_table, seq_lens, cu_seqlens, k, v, k_scale, v_scale)
    return k, v, cu_seqlens


def _gather_kv_op(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out_dtype, total_tokens, out):
    """``gather_kv`` while ``torch.compile`` traces: the ``kvpool::gather_kv(_out)`` custom ops."""
    if out is not None:
        cu = torch.ops.kvpool.gather_kv_out(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out[0], out[1])
        return out[0], out[1], cu
    if out_dtype is None:
        out_dtype = torch.bfloat16 if k_cache.dtype == _b.FP8_DTYPE else k_cache.dtype
    rows = -1 if total_tokens is None else _int_at_least("total_tokens", total_tokens, 0, "a non-negative int")
    return torch.ops.kvpool.gather_kv(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out_dtype, rows)


def _rows_source(total_tokens, out) -> str:
    """Where a gather's row count came from, for error messages."""
    if total_tokens is not None:
        return f"total_tokens={total_tokens}"
    return f"out holds {out[0].shape[0]} rows"


def _gather_rows(seq_lens, total_tokens, out) -> int | None:
    """The output row count of a gather as far as the host knows it without a device sync, checked.

    ``total_tokens`` must be a non-negative int and agree with ``out``'s rows. ``sum(seq_lens)`` is
    compared with them when it costs no sync (CPU tensors) or ``KVPOOL_DEBUG=1``. Returns ``None``
    when neither ``total_tokens`` nor ``out`` is given and the sum would need a sync.
    """
    rows = None
    if total_tokens is not None:
        rows = _int_at_least("total_tokens", total_tokens, 0, "a non-negative int")
        total_tokens = rows
    if out is not None:
        if rows is not None and rows != out[0].shape[0]:
            raise KernelError(f"total_tokens={rows} but out holds {out[0].shape[0]} rows: they must agree "
                              "(both sum(seq_lens))")
        rows = out[0].shape[0]
    if seq_lens.is_cuda and not _b.debug_checks():
        return rows
    actual = int(seq_lens.to(torch.int64).sum())
    if rows is not None and rows != actual:
        raise KernelError(f"{_rows_source(total_tokens, out)} but sum(seq_lens) is {actual}: pass "
                          f"total_tokens={actual} (or None) and [{actual}, kv_heads, head_dim] outputs")
    return actual


def _int_at_least(name, value, low: int, expected: str) -> int:
    """``value`` as an int >= ``low``; bools (``True`` is no count), floats and the rest raise :class:`KernelError`."""
    number = exact_int(value)
    if number is not None and number >= low:
        return number
    raise KernelError(f"{name} must be {expected}, got {value!r}")


def _finite_float(name, value) -> float:
    """``value`` as a finite float; bools (``True`` is no scale) raise :class:`KernelError`."""
    try:
        number = None if is_bool(value) else float(value)
    except (TypeError, ValueError, RuntimeError):
        number = None
    if number is None or not math.isfinite(number):
        raise KernelError(f"{name} must be a finite float, got {value!r}")
    return number


def _check_gather_out(out, out_dtype, kv_heads, head_dim, device) -> None:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise KernelError("out must be a (k, v) pair of tensors [sum(seq_lens), kv_heads, head_dim]")
    k, v = out
    if k.dim() != 3 or tuple(k.shape[1:]) != (kv_heads, head_dim) or k.shape != v.shape:
        raise KernelError(f"out shapes {tuple(k.shape)}, {tuple(v.shape)} must both be "
                          f"[sum(seq_lens), {kv_heads}, {head_dim}]")
    if k.dtype != v.dtype or (out_dtype is not None and k.dtype != out_dtype):
        raise KernelError(f"out dtypes {k.dtype}/{v.dtype} differ from each other or from out_dtype={out_dtype}")
    if not (k.is_contiguous() and v.is_contiguous()) or k.device != device or v.device != device:
        raise KernelError(f"out tensors must be contiguous and on {device}")


def copy_blocks(caches: Sequence[torch.Tensor], src, dst) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every tensor of ``caches`` (copy-on-write), in place.

    Parameters
    ----------
    caches : sequence of torch.Tensor
        Tensors indexed by block id on dim 0: the K and V pages of every layer ``[num_blocks,
        block_size, kv_heads, head_dim]`` and, for fp8, their per-token scales ``[num_blocks,
        block_size, kv_heads]``; any rank >= 1 (a 5-D ``[num_blocks, 2, ...]`` works). Tensors of one
        shape/strides/element size are copied in one launch.
    src, dst : torch.Tensor or sequence of int
        ``[num_pairs]`` block ids; each ``dst`` distinct and not a ``src`` (fresh copy-on-write blocks).
        int32/int64 tensors or sequences of ints (floats and bools raise :class:`KernelError`). Ids on
        the host (sequences, CPU tensors) are always range-checked (:class:`BlockIndexError`); ids on a
        GPU only with ``KVPOOL_DEBUG=1``.
    """
    if isinstance(caches, torch.Tensor) or not caches:
        raise KernelError("caches must be a non-empty list of tensors (e.g. every layer's K and V pages)")
    if torch.compiler.is_compiling():
        src, dst = (ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.int64) for ids in (src, dst))
        torch.ops.kvpool.copy_blocks(list(caches), src, dst)
        return
    first = caches[0]
    for i, t in enumerate(caches):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise KernelError(f"caches[{i}] must be a tensor indexed by block id on dim 0")
        if t.shape[0] != first.shape[0]:
            raise KernelError(f"caches[{i}] has {t.shape[0]} blocks but caches[0] has {first.shape[0]}: "
                              "all tensors must cover the same block ids")
        if t.dim() > 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise KernelError(f"caches[{i}] must be contiguous along its last dimension, strides {t.stride()}")
        if t.device != first.device:
            raise KernelError(f"caches[{i}] is on {t.device} but caches[0] on {first.device}")
        _check_writable(f"caches[{i}]", t)
    src = as_block_ids("src", src, first.shape[0])
    dst = as_block_ids("dst", dst, first.shape[0])
    if src.shape != dst.shape:
        raise KernelError(f"src ({src.numel()} ids) and dst ({dst.numel()} ids) must pair up one to one")
    if _b.debug_checks() or not (src.is_cuda or dst.is_cuda):  # host-side ids: checking costs no sync
        check_copy_pairs(src, dst, first.shape[0])
    src, dst = src.to(first.device).contiguous(), dst.to(first.device).contiguous()
    if not _b.use_triton(*caches):
        _ref.copy_blocks_reference(caches, src, dst)
        return
    from .block_copy import copy_blocks_group_triton
    groups: dict = {}
    for t in caches:
        groups.setdefault((tuple(t.shape), t.stride(), t.element_size()), []).append(t)
    for tensors in groups.values():
        if not copy_blocks_group_triton(tensors, src, dst):  # a layout the kernel cannot express
            _ref.copy_blocks_reference(tensors, src, dst)


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window=None, logit_soft_cap=None,
                 k_scale=None, v_scale=None, *, sinks=None, out=None, workspace=None):
    """Decode attention: one query token per sequence against its paged K and V.

    Parameters
    ----------
    q : torch.Tensor
        ``[batch, q_heads, head_dim]`` float16/bfloat16/float32 (the cache dtype unless the cache is fp8),
        ``head_dim`` contiguous. ``q_heads`` is a multiple of ``kv_heads``; q head ``j`` reads KV head
        ``j // (q_heads // kv_heads)``.
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, kv_heads, head_dim]``.
    block_table : torch.Tensor
        ``[batch, max_blocks]`` int32.
    seq_lens : torch.Tensor
        ``[batch]`` int32 tokens per sequence, the query's own token included; 0 (a padding row) gives
        a zero output row.
    scale : float
        Multiplies ``q . k`` (usually ``head_dim ** -0.5``).
    sliding_window : int, optional
        Attend to the last ``sliding_window`` tokens only, the query's own included (flash-attn's
        window ``(sliding_window - 1, 0)``).
    logit_soft_cap : float, optional
        Scores become ``c * tanh(scores / c)`` before the softmax (Gemma-2).
    k_scale, v_scale : torch.Tensor, optional
        fp8 caches: float32 ``[kv_heads]`` or ``[num_blocks, block_size, kv_heads]``.
    sinks : torch.Tensor, optional
        Attention sinks (gpt-oss): ``[q_heads]`` float32, one learned logit per q head that joins the
        softmax's denominator and carries no value: ``out = sum_t e^(s_t) v_t / (e^sink + sum_t e^(s_t))``
        with ``s_t`` the scaled (and soft-capped) scores; the sink itself is neither scaled nor capped.
        ``-inf`` is no sink.
    out : torch.Tensor, optional
        Preallocated output ``[batch, q_heads, head_dim]`` ``q.dtype`` (``head_dim`` contiguous).
    workspace : DecodeWorkspace, optional
        Scratch for the split-K partials and their log-sum-exps (:mod:`kvpool.kernels.workspace`), reused
        and grown as needed; default one cached per (device, CUDA stream).

    Returns
    -------
    torch.Tensor
        ``[batch, q_heads, head_dim]`` in ``q.dtype`` (``out`` when given).

    Notes
    -----
    The checks' verdict and the launch plan are remembered per (pointers, shapes, strides, dtypes,
    devices, scalars, environment) (:mod:`kvpool.kernels.proof_cache`; calls with CPU sinks, whose
    values are checked, are not cached): a decode loop passing the same tensors again skips them.
    """
    args = (q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, sinks)
    if torch.compiler.is_compiling():
        scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
        if out is None:
            return torch.ops.kvpool.paged_decode(*args[:5], scale, sliding_window, logit_soft_cap, *args[5:])
        torch.ops.kvpool.paged_decode_out(*args[:5], scale, sliding_window, logit_soft_cap, *args[5:], out)
        return out
    env = _pc.cacheable_env()
    key = None if env is None else _decode_key(*args, scale, sliding_window, logit_soft_cap, out, workspace, env)
    proof = _DECODE_PROOFS.get(key) if key is not None else None
    if proof is None:
        proof = _check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window,
                                    logit_soft_cap, k_scale, v_scale, sinks, out, workspace)
        if key is not None:
            _DECODE_PROOFS.put(key, proof)
    plan, scale, sliding_window, logit_soft_cap = proof
    if plan is not None:
        from .decode import paged_decode_triton
        return paged_decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window,
                                   logit_soft_cap, k_scale, v_scale, out=out, sinks=sinks, workspace=workspace,
                                   plan=plan)
    result = _ref.paged_decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window,
                                         logit_soft_cap, k_scale, v_scale, sinks=sinks)
    return result if out is None else out.copy_(result)


_DECODE_PROOFS = _pc.ProofCache()


def _decode_key(q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, sinks, scale, sliding_window,
                logit_soft_cap, out, workspace, env) -> tuple | None:
    """The proof-cache key of a decode call, or ``None`` (not cacheable: an argument of an unexpected type)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
            and isinstance(block_table, torch.Tensor) and isinstance(seq_lens, torch.Tensor)):
        return None
    for t in (k_scale, v_scale, sinks, out):
        if t is not None and not isinstance(t, torch.Tensor):
            return None
    if sinks is not None and sinks.device.type == "cpu":  # its values are checked: a new tensor at the same
        return None                                       # address and version could hold a NaN
    for x in (scale, sliding_window, logit_soft_cap):  # the type too: 2 == 2.0 == True as dict keys
        if x is not None and type(x) not in (int, float):
            return None
    tk = _pc.tensor_key
    return (tk(q), tk(k_cache), tk(v_cache), tk(block_table), tk(seq_lens), tk(k_scale), tk(v_scale),
            tk(sinks), tk(out), type(scale), scale, type(sliding_window), sliding_window,
            type(logit_soft_cap), logit_soft_cap, None if workspace is None else workspace.device, env)


def _check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, logit_soft_cap,
                        k_scale, v_scale, sinks, out, workspace) -> tuple:
    """Every check of :func:`paged_decode`; returns ``(plan or None for the torch path, scale, window, cap)``."""
    _b.check_cache_pair(k_cache, v_cache)
    _b.check_scales(k_cache, k_scale, v_scale)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise KernelError(f"q must be [batch, q_heads, head_dim], got {tuple(getattr(q, 'shape', ()))}")
    if q.shape[2] != head_dim or q.shape[1] % kv_heads:
        raise KernelError(f"q shape {tuple(q.shape)} does not fit the cache: head_dim must be {head_dim} and "
                          f"q_heads a multiple of kv_heads={kv_heads}")
    if q.dtype not in _b.COMPUTE_DTYPES:
        raise KernelError(f"q dtype {q.dtype} is not supported: use float32, float16 or bfloat16")
    if k_cache.dtype != _b.FP8_DTYPE and q.dtype != k_cache.dtype:
        raise KernelError(f"q is {q.dtype} but the cache is {k_cache.dtype}: cast q to the cache dtype")
    if q.stride(-1) != 1:
        raise KernelError(f"q must be contiguous along head_dim, got strides {q.stride()}")
    _b.check_block_table(block_table, seq_lens, num_blocks, block_size)
    if block_table.shape[0] != q.shape[0]:
        raise KernelError(f"q has {q.shape[0]} sequences but block_table has {block_table.shape[0]} rows")
    _b.same_device({"q": q, "k_cache": k_cache, "block_table": block_table, "seq_lens": seq_lens})
    scale, sliding_window, logit_soft_cap = _attention_scalars(scale, sliding_window, logit_soft_cap)
    _b.check_sinks(sinks, q.shape[1], q.device)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        raise KernelError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, head_dim contiguous")
    if out is not None:
        _check_writable("out", out)
    if workspace is not None:
        if not isinstance(workspace, DecodeWorkspace):
            raise KernelError(f"workspace must be a kvpool.kernels.DecodeWorkspace or None, got "
                              f"{type(workspace).__name__}")
        workspace.check_device(q.device)
    plan = None
    if _b.use_triton(q, k_cache):
        from .decode import plan_decode
        plan = plan_decode(q, k_cache, v_cache, block_table, scale, sliding_window, logit_soft_cap, k_scale,
                           v_scale, sinks)
    return plan, scale, sliding_window, logit_soft_cap


def _attention_scalars(scale, sliding_window, logit_soft_cap) -> tuple:
    """``scale`` a finite float, ``sliding_window`` a positive int (capped to int32) or None, ``logit_soft_cap``
    a positive finite float or None; anything else raises :class:`KernelError`."""
    scale = _finite_float("scale", scale)
    if sliding_window is not None:
        sliding_window = _int_at_least("sliding_window", sliding_window, 1, "a positive int or None")
        sliding_window = min(sliding_window, 2 ** 31 - 1)  # wider than any int32 seq_len: same result, int32 arg
    if logit_soft_cap is not None:
        logit_soft_cap = _finite_float("logit_soft_cap", logit_soft_cap)
        if logit_soft_cap <= 0:
            raise KernelError(f"logit_soft_cap must be a positive float or None, got {logit_soft_cap!r}")
    return scale, sliding_window, logit_soft_cap
