"""Triton kernel: copy-on-write of whole blocks, every layer in one launch.

The page tensors of all layers (K and V alike) have one shape, stride pattern and dtype, so a
single launch copies them all: a small device array holds each tensor's start relative to the
first one (in units of 16 elements, so the compiler still knows every row is 16-element aligned and
uses 16-byte vector accesses) and the program ``(pair, tensor, chunk)`` copies one chunk of block
``src[pair]`` to ``dst[pair]`` in tensor ``tensor``. The copy is bitwise (fp8 pages and float32
scale tensors included). Tensors with another shape (the fp8 scales) form their own group: one
launch per group. Tensors above 4-D have their middle dims collapsed where the strides allow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# layout key -> (int64 device tensor, unit): the same caches every step reuse one table at a fixed address
# (no host->device copy per call, CUDA-graph friendly)
_OFFSET_TABLES: dict = {}


@triton.jit
def _copy_blocks_kernel(
    offset_table_ptr,                    # [num_tensors] int64: (tensor start - first start) / UNIT elements
    first_ptr,                           # the first tensor
    src_ptr, dst_ptr,                    # [num_pairs] int32/int64 block ids
    stride_b, stride_a, stride_m,        # strides of the normalised [num_blocks, A, M, C] view (C: stride 1)
    A: tl.constexpr, M: tl.constexpr, C: tl.constexpr, UNIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pair = tl.program_id(0)
    tensor = tl.program_id(1)
    chunk = tl.program_id(2)
    base = first_ptr + tl.load(offset_table_ptr + tensor) * UNIT
    src_block = tl.load(src_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ptr + pair).to(tl.int64)
    rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    row_off = (rows // M) * stride_a + (rows % M) * stride_m
    offs_c = tl.arange(0, BLOCK_C)
    if BLOCK_C == C:
        mask = (rows < A * M)[:, None]  # constant along C: keeps 16-byte vector accesses
    else:
        mask = (rows < A * M)[:, None] & (offs_c[None, :] < C)
    offs = row_off[:, None] + offs_c[None, :]
    x = tl.load(base + src_block * stride_b + offs, mask=mask)
    tl.store(base + dst_block * stride_b + offs, x, mask=mask)


def _normalised(t: torch.Tensor):
    """View ``t`` ``[num_blocks, ...]`` as 4-D ``[num_blocks, A, M, C]``: (shape, strides) of that view.

    Up to 4-D, ``t``'s own dims (padded in front). Above, the dims between the block dim and the
    last (``C``, stride 1) are collapsed where their strides allow (a contiguous ``[num_blocks, 2,
    block_size, kv_heads, head_dim]`` gives ``M = 2 * block_size * kv_heads``); ``None`` when more
    than two of them remain.
    """
    shape, strides = list(t.shape[1:]), list(t.stride()[1:])
    if len(shape) > 3:
        outer = []  # (size, stride), outermost first, size-1 dims dropped
        for size, stride in zip(shape[:-1], strides[:-1]):
            if size == 1:
                continue
            if outer and outer[-1][1] == size * stride:
                outer[-1] = (outer[-1][0] * size, stride)
            else:
                outer.append((size, stride))
        if len(outer) > 2:
            return None
        outer = [(1, 0)] * (2 - len(outer)) + outer
        shape, strides = [d[0] for d in outer] + shape[-1:], [d[1] for d in outer] + strides[-1:]
    while len(shape) < 3:
        shape.insert(0, 1)
        strides.insert(0, 0)
    return (t.shape[0], *shape), (t.stride(0), *strides)


def _offset_table(tensors, device):
    """Each tensor's start relative to the first, in units of 16 elements when they all allow it, else 1."""
    # everything the table depends on: the offsets are in elements of the tensors' size (dtype), and the
    # kernel applies them with the group's shape/strides; data pointers alone matched other views
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (str(device), tuple(t.dtype for t in tensors), tuple(tensors[0].shape), tensors[0].stride(), ptrs)
    cached = _OFFSET_TABLES.get(key)
    if cached is None:
        if len(_OFFSET_TABLES) > 64:
            _OFFSET_TABLES.clear()
        size = tensors[0].element_size()
        deltas = [(p - ptrs[0]) // size for p in ptrs]  # starts are element aligned: exact
        unit = 16 if all(d % 16 == 0 for d in deltas) else 1
        cached = (torch.tensor([d // unit for d in deltas], dtype=torch.int64, device=device), unit)
        _OFFSET_TABLES[key] = cached
    return cached


def copy_blocks_group_triton(tensors, src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Copy blocks ``src -> dst`` in tensors of one shape/strides/element size (checked by the caller).

    Returns False, copying nothing, when the layout does not fit ``[num_blocks, A, M, C]`` (see
    :func:`_normalised`): the caller copies those with torch indexing.
    """
    if src.numel() == 0 or not tensors or tensors[0].numel() == 0:
        return True
    normalised = _normalised(tensors[0])
    if normalised is None:
        return False
    (_, a, m, c), (stride_b, stride_a, stride_m, _) = normalised
    bits = _BITS_DTYPE[tensors[0].element_size()]
    like = tensors[0].view(bits)  # bitwise copy: fp8/bf16/fp32 all move as integers
    block_c = triton.next_power_of_2(c)
    block_r = min(triton.next_power_of_2(a * m), max(1, 16384 // (block_c * tensors[0].element_size())))
    grid = (src.numel(), len(tensors), triton.cdiv(a * m, block_r))
    offsets, unit = _offset_table(tensors, like.device)
    _copy_blocks_kernel[grid](
        offsets, like, src, dst,
        stride_b, stride_a, stride_m,
        A=a, M=m, C=c, UNIT=unit, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return True


__all__ = ["copy_blocks_group_triton"]
