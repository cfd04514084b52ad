"""Triton kernel of :mod:`kvpool.kernels.block_stage`: whole blocks between block tensors and staging rows.

Program ``(j, tensor, chunk)`` moves one chunk of tensor ``tensor``'s row ``ids[j]`` to (or from) its
place in staging row ``j``. A small device table (built once per cache layout) holds, per tensor, its
start relative to the first tensor, its row size and the row's offset inside a staged block, all in
units of ``VEC`` words: multiplying by the constexpr ``VEC`` tells the compiler every address is
``VEC * word`` (16 bytes for real caches) aligned, so loads and stores are 16-byte vectors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_stage import row_bytes

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
_TILE_BYTES = 16384  # bytes per program: a 32 KiB bf16 row of a Llama-8B block is two programs
# layout key -> (int64 [3, num_tensors] device table, word dtype, VEC): one table per cache, built once
_LAYOUT_TABLES: dict = {}


@triton.jit
def _block_stage_kernel(
    first_ptr,                  # word view of the first block tensor
    staging_ptr,                # word view of staging [n, words_per_block]
    ids_ptr,                    # [n] int32/int64 block ids
    table_ptr,                  # [3, num_tensors] int64, in VEC words: tensor start - first start, row size,
                                # the row's offset inside a staged block
    num_tensors, num_blocks, stage_stride,  # stage_stride: staging row stride in VEC words
    VEC: tl.constexpr, BLOCK: tl.constexpr, TO_STAGING: tl.constexpr,
):
    j = tl.program_id(0)
    tensor = tl.program_id(1)
    chunk = tl.program_id(2)
    block = tl.load(ids_ptr + j).to(tl.int64)
    start = tl.load(table_ptr + tensor)
    row = tl.load(table_ptr + num_tensors + tensor)
    in_block = tl.load(table_ptr + 2 * num_tensors + tensor)
    pages = first_ptr + (start + block * row) * VEC
    stage = staging_ptr + (j.to(tl.int64) * stage_stride + in_block) * VEC
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < row * VEC) & (block >= 0) & (block < num_blocks)  # never outside the row or the cache
    if TO_STAGING:
        x = tl.load(pages + offs, mask=mask)
        tl.store(stage + offs, x, mask=mask)
    else:
        x = tl.load(stage + offs, mask=mask)
        tl.store(pages + offs, x, mask=mask)


def layout_table(tensors, staging: torch.Tensor):
    """``(table, word dtype, VEC)`` of the kernel for these tensors (cached per tensor layout)."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    rows = tuple(row_bytes(t) for t in tensors)
    key = (str(staging.device), ptrs, rows, staging.data_ptr() % 16)
    cached = _LAYOUT_TABLES.get(key)
    if cached is None:
        if len(_LAYOUT_TABLES) > 64:
            _LAYOUT_TABLES.clear()
        deltas = [p - ptrs[0] for p in ptrs]
        word = next(w for w in (8, 4, 2, 1) if all(x % w == 0 for x in (*rows, *ptrs, staging.data_ptr())))
        vec = next(v for v in (16 // word, 8 // word, 4 // word, 2 // word, 1)
                   if v >= 1 and all((x // word) % v == 0 for x in (*rows, *deltas)))
        in_block = [sum(rows[:i]) for i in range(len(rows))]
        table = [[x // (word * vec) for x in col] for col in (deltas, rows, in_block)]
        cached = (torch.tensor(table, dtype=torch.int64, device=staging.device), _WORD_DTYPES[word], vec)
        _LAYOUT_TABLES[key] = cached
    return cached


def launch_block_stage(tensors, ids: torch.Tensor, staging: torch.Tensor, to_staging: bool) -> None:
    """One launch moving ``ids.numel()`` blocks between ``tensors`` and ``staging[:n]``."""
    table, word, vec = layout_table(tensors, staging)
    first = tensors[0].reshape(-1).view(torch.uint8).view(word)
    stage = staging.view(word)
    max_row = max(row_bytes(t) for t in tensors) // word.itemsize
    tile = min(triton.next_power_of_2(max_row), max(vec, _TILE_BYTES // word.itemsize))
    grid = (ids.numel(), len(tensors), triton.cdiv(max_row, tile))
    _block_stage_kernel[grid](
        first, stage, ids, table, len(tensors), tensors[0].shape[0], stage.shape[1] // vec,
        VEC=vec, BLOCK=tile, TO_STAGING=to_staging, num_warps=4,
    )


__all__ = ["launch_block_stage", "layout_table"]
