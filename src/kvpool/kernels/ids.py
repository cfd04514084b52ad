"""Block-id arguments of :func:`kvpool.kernels.copy_blocks`: parsed exactly, range-checked where it is free.

Ids given as a Python/numpy sequence or a CPU tensor are known to the host, so checking them costs no
device sync: they are always checked. Ids already on the GPU are checked only with ``KVPOOL_DEBUG=1``.
``exact_int`` is the kernels' one integer rule, for ids and scalar arguments alike.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import BlockIndexError, KernelError
from .backend import INDEX_DTYPES


def is_bool(value) -> bool:
    """A Python, numpy or torch bool: never a count, an id or a scale (``True`` would read as 1)."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def exact_int(value) -> int | None:
    """``value`` as an int when it is an integer (Python, numpy, integer tensor of one element), else None.

    Bools and floats give None, integral or not (``1.0``): nothing is truncated.
    """
    if is_bool(value):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _parse_list(name: str, ids, num_blocks: int) -> torch.Tensor:
    """Integers in ``[0, num_blocks)`` as an int64 CPU tensor; ``[0.5]``, ``[1.0]``, ``[True]`` raise: no truncation."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise KernelError(f"{name} must hold integer block ids in a 1-D array, got {ids.ndim}-D {ids.dtype}")
        ids = ids.tolist()
    ids = list(ids)  # one pass over an iterator
    values = [exact_int(x) for x in ids]
    for i, (x, v) in enumerate(zip(ids, values)):
        if v is None:
            raise KernelError(f"{name} must hold integer block ids, got {name}[{i}]={x!r}: pass ints "
                              "(round floats yourself)")
    for i, v in enumerate(values):  # before torch.tensor: 2**70 must be a range error, not an overflow
        if not 0 <= v < num_blocks:
            raise BlockIndexError(f"{name}[{i}]={v} is outside [0, {num_blocks}): the cache has {num_blocks} blocks")
    return torch.tensor(values, dtype=torch.int64)


def as_block_ids(name: str, ids, num_blocks: int) -> torch.Tensor:
    """``ids`` (1-D int32/int64 tensor, or a sequence of ints) as a 1-D int32/int64 tensor, not yet moved.

    A sequence is range-checked here against ``num_blocks``; a tensor by :func:`check_copy_pairs`.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype not in INDEX_DTYPES:
            raise KernelError(f"{name} must be a 1-D int32/int64 tensor (or a list of ints), got "
                              f"{tuple(ids.shape)} {ids.dtype}")
        return ids
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise KernelError(f"{name} must be a 1-D int32/int64 tensor or a list of ints, got {ids!r}")
    return _parse_list(name, ids, num_blocks)


def check_copy_pairs(src: torch.Tensor, dst: torch.Tensor, num_blocks: int) -> None:
    """Ids in ``[0, num_blocks)``, destinations distinct and never a source (reads ids back if on a GPU).

    Raises
    ------
    BlockIndexError
        Naming the first offending entry.
    """
    if src.numel() == 0:
        return
    for name, ids in (("src", src), ("dst", dst)):
        i64 = ids.to(torch.int64)
        bad = (i64 < 0) | (i64 >= num_blocks)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise BlockIndexError(f"{name}[{i}]={int(i64[i])} is outside [0, {num_blocks}): the cache has "
                                  f"{num_blocks} blocks")
    d = dst.to(torch.int64)
    if d.unique().numel() != d.numel():
        raise BlockIndexError(f"dst holds repeated block ids {d.tolist()}: each destination is written once")
    clash = torch.isin(d, src.to(device=d.device, dtype=torch.int64))
    if bool(clash.any()):
        i = int(clash.nonzero()[0, 0])
        raise BlockIndexError(f"dst[{i}]={int(d[i])} is also a src block: the copies would race; copy-on-write "
                              "targets freshly allocated blocks")


__all__ = ["as_block_ids", "check_copy_pairs", "exact_int", "is_bool"]
