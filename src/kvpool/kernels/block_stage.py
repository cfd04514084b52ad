"""Triton kernels: gather whole blocks of every block tensor into a block-major staging buffer, and back.

A block's bytes are spread over every tensor of ``PagedKVCache.block_tensors()`` (K and V of each slot,
per-token fp8 scales): the row ``t[b]`` of each. The host tier moves blocks between the GPU pages and
block-major host pages ``[num_host_blocks, bytes_per_block]``; one staging row holds one block, its
tensors' rows back to back in ``block_tensors()`` order::

    staging[j] = t_0[ids[j]].bytes | t_1[ids[j]].bytes | ... | t_{T-1}[ids[j]].bytes

:func:`stage_blocks` fills ``staging[:n]`` in ONE launch (program ``(j, tensor, chunk)`` copies one
chunk of one row), so the staging-to-host move is one large copy per run of consecutive host ids;
:func:`unstage_blocks` is the scatter back. Every tensor is raw bytes: the kernel moves words of the
widest integer type that divides every row size and address (int64 for real caches), and the
tables it reads hold offsets in units of ``VEC`` words (16 bytes when they all allow it) so the
compiler knows each row is 16-byte aligned and issues vector loads (the kernel: ``block_stage_kernel.py``).

Bounds: the wrappers check ids (always when they are on the host, with ``KVPOOL_DEBUG=1`` when on a
GPU); the kernel masks every access to its row and skips ids outside ``[0, num_blocks)``, so a bad
id never reads or writes out of bounds.
"""
from __future__ import annotations

import math

import torch

from ..errors import BlockIndexError, KernelError
from . import backend as _b
from . import reference as _ref
from .ids import as_block_ids


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one block's row ``t[b]`` of a block tensor ``t`` ``[num_blocks, ...]``."""
    return math.prod(t.shape[1:]) * t.element_size()


def bytes_per_block(tensors) -> int:
    """One block's bytes over ``tensors`` (a staging row's width): ``sum(row_bytes(t))``."""
    return sum(row_bytes(t) for t in tensors)


def _check_tensors(tensors, staging: torch.Tensor) -> int:
    """Block tensors (contiguous, one block count, staging's device) and staging; returns ``num_blocks``."""
    if isinstance(tensors, torch.Tensor) or not tensors:
        raise KernelError("tensors must be a non-empty list of block tensors (cache.block_tensors())")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise KernelError(f"tensors[{i}] must be a tensor indexed by block id on dim 0, got "
                              f"{getattr(t, 'shape', type(t).__name__)}")
        if t.shape[0] != first.shape[0]:
            raise KernelError(f"tensors[{i}] has {t.shape[0]} blocks but tensors[0] has {first.shape[0]}: all "
                              "block tensors must cover the same block ids")
        if not t.is_contiguous():
            raise KernelError(f"tensors[{i}] (shape {tuple(t.shape)}, strides {t.stride()}) must be contiguous: "
                              "a block's row is moved as one run of bytes (pass cache.block_tensors())")
        if t.device != staging.device:
            raise KernelError(f"tensors[{i}] is on {t.device} but staging on {staging.device}: allocate the "
                              "staging buffer on the cache's device")
    if staging.dtype != torch.uint8 or staging.dim() != 2 or not staging.is_contiguous():
        raise KernelError(f"staging must be a contiguous 2-D uint8 tensor [rows, bytes_per_block], got "
                          f"{tuple(staging.shape)} {staging.dtype}")
    width = bytes_per_block(tensors)
    if staging.shape[1] != width:
        raise KernelError(f"staging rows hold {staging.shape[1]} bytes but one block of these tensors is {width} "
                          "bytes: allocate staging as [rows, bytes_per_block(tensors)]")
    return first.shape[0]


def _checked_ids(block_ids, num_blocks: int, staging: torch.Tensor, distinct: bool) -> torch.Tensor:
    """``block_ids`` as a 1-D int tensor on staging's device, range-checked where that costs no sync."""
    ids = as_block_ids("block_ids", block_ids, num_blocks)
    if ids.numel() > staging.shape[0]:
        raise KernelError(f"{ids.numel()} block ids but staging holds {staging.shape[0]} rows: stage at most "
                          "that many blocks per call (or allocate a larger staging buffer)")
    if _b.debug_checks() or not ids.is_cuda:
        i64 = ids.to(torch.int64)
        bad = (i64 < 0) | (i64 >= num_blocks)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise BlockIndexError(f"block_ids[{i}]={int(i64[i])} is outside [0, {num_blocks}): the cache has "
                                  f"{num_blocks} blocks")
        if distinct and i64.unique().numel() != i64.numel():
            raise BlockIndexError(f"block_ids {i64.tolist()} repeat a block: each block is written once "
                                  "(the writes would race)")
    return ids.to(staging.device).contiguous()


def _as_tensor(ids) -> torch.Tensor:
    return ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.int64)


def stage_blocks(tensors, block_ids, staging: torch.Tensor) -> None:
    """Gather blocks into a block-major staging buffer: ``staging[j]`` = every tensor's row ``block_ids[j]``.

    Parameters
    ----------
    tensors : list of torch.Tensor
        The block tensors (``cache.block_tensors()``), each contiguous ``[num_blocks, ...]`` of any dtype
        (bf16/fp16/fp8 pages, float32 scales): moved as raw bytes.
    block_ids : torch.Tensor or sequence of int
        ``[n]`` int32/int64 block ids in ``[0, num_blocks)``, ``n <= staging.shape[0]``.
    staging : torch.Tensor
        ``[rows, bytes_per_block(tensors)]`` uint8, contiguous, on the tensors' device. Row ``j < n``
        receives ``t_0[ids[j]] | t_1[ids[j]] | ...`` (bytes, ``tensors`` order); later rows are untouched.

    Raises
    ------
    KernelError
        Bad tensors or staging (shape, dtype, device, layout), more ids than staging rows.
    BlockIndexError
        An id outside ``[0, num_blocks)`` (ids on the host always; on a GPU with ``KVPOOL_DEBUG=1``).

    Examples
    --------
    >>> import torch
    >>> k = torch.arange(24, dtype=torch.float32).view(6, 4)      # 6 blocks of 4 floats: 16 bytes
    >>> s = torch.arange(6, dtype=torch.int8).view(6, 1).repeat(1, 4)  # 4 bytes per block
    >>> staging = torch.empty(2, 20, dtype=torch.uint8)
    >>> stage_blocks([k, s], [5, 1], staging)
    >>> staging[0, :16].view(torch.float32).tolist(), staging[0, 16:].tolist()
    ([20.0, 21.0, 22.0, 23.0], [5, 5, 5, 5])
    """
    if torch.compiler.is_compiling():  # the op's real implementation is this function: checks run at run time
        torch.ops.kvpool.stage_blocks(list(tensors), _as_tensor(block_ids), staging)
        return
    _move_blocks(tensors, block_ids, staging, to_staging=True)


def unstage_blocks(staging: torch.Tensor, tensors, block_ids) -> None:
    """Scatter staged blocks back: every tensor's row ``block_ids[j]`` = its bytes in ``staging[j]``.

    The inverse of :func:`stage_blocks` (same arguments); ``block_ids`` must be distinct (each row is
    written once). Raises as :func:`stage_blocks` does, plus :class:`BlockIndexError` on a repeated id
    (checked where ids are on the host).
    """
    if torch.compiler.is_compiling():
        torch.ops.kvpool.unstage_blocks(staging, list(tensors), _as_tensor(block_ids))
        return
    _move_blocks(tensors, block_ids, staging, to_staging=False)


def _move_blocks(tensors, block_ids, staging, to_staging: bool) -> None:
    """Check, then one launch (or the torch reference) each way; a scatter's ids must be distinct."""
    num_blocks = _check_tensors(tensors, staging)
    ids = _checked_ids(block_ids, num_blocks, staging, distinct=not to_staging)
    if ids.numel() == 0:
        return
    if _b.use_triton(*tensors, staging):
        from .block_stage_kernel import launch_block_stage
        launch_block_stage(tensors, ids, staging, to_staging=to_staging)
    elif to_staging:
        _ref.stage_blocks_reference(tensors, ids, staging)
    else:
        _ref.unstage_blocks_reference(staging, tensors, ids)


__all__ = ["bytes_per_block", "row_bytes", "stage_blocks", "unstage_blocks"]
