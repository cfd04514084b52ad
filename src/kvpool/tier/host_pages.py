"""The host tier's pages: one block-major buffer in (pinned) host memory, one row per host block.

A GPU block's bytes are spread over every block tensor of the cache (``cache.block_tensors()``: K and V
of each slot, per-token fp8 scales); on the host they sit together, one contiguous row per block::

    buffer[h] = t_0[b].bytes | t_1[b].bytes | ... | t_{T-1}[b].bytes    (block_tensors() order)

the layout :func:`kvpool.kernels.stage_blocks` writes into a staging row, so moving blocks between
staging and host is one ``copy_`` per run of consecutive host ids. The buffer is pinned (page-locked)
when the cache is on CUDA: only pinned memory copies asynchronously and at the link's speed.
"""
from __future__ import annotations

import torch

from .._arrays import as_int
from ..errors import BlockIndexError, InvalidArgumentError
from ..kernels.block_stage import bytes_per_block, row_bytes


class HostPages:
    """Block-major host pages with the geometry of one TP shard's GPU cache.

    Parameters
    ----------
    cache : PagedKVCache
        The GPU (or CPU stand-in) pages; only ``block_tensors()`` and ``device`` are read.
    num_host_blocks : int
        Host blocks, >= 1 (``kvpool plan --host-kv-gib N`` gives the count for a budget).

    Attributes
    ----------
    buffer : torch.Tensor
        ``[num_host_blocks, bytes_per_block]`` uint8 on the CPU, pinned when the cache is on CUDA. Rows
        hold whatever was last copied in (uninitialised until then).
    bytes_per_block : int
        One block's bytes over all block tensors, the same as on the GPU.
    pinned : bool

    Raises
    ------
    InvalidArgumentError
        ``num_host_blocks`` is not a positive integer, or the host cannot allocate (or pin) the buffer.

    Examples
    --------
    >>> from kvpool import PagedKVCache
    >>> cache = PagedKVCache.for_shard("llama-3.1-8b", num_blocks=4, block_size=16, tp_rank=0, tp_size=1,
    ...                                device="cpu")
    >>> host = HostPages(cache, num_host_blocks=8)
    >>> host.bytes_per_block   # 32 layers * (K + V) * 16 tokens * 8 heads * 128 dims * 2 bytes
    2097152
    >>> host.memory_bytes() == 8 * 2097152
    True
    """

    def __init__(self, cache, num_host_blocks):
        num_host_blocks = as_int(num_host_blocks, "num_host_blocks")
        if num_host_blocks < 1:
            raise InvalidArgumentError(f"num_host_blocks={num_host_blocks} must be >= 1; size the host tier with "
                                       "`kvpool plan --host-kv-gib N` (kv_cache.host_tier.blocks)")
        tensors = cache.block_tensors()
        self.num_host_blocks = num_host_blocks
        self.bytes_per_block = bytes_per_block(tensors)
        self.pinned = torch.device(cache.device).type == "cuda"
        self._rows = [(t.dtype, tuple(t.shape[1:]), row_bytes(t)) for t in tensors]
        self.buffer = self._allocate()

    def _allocate(self) -> torch.Tensor:
        nbytes = self.num_host_blocks * self.bytes_per_block
        try:
            return torch.empty((self.num_host_blocks, self.bytes_per_block), dtype=torch.uint8,
                               pin_memory=self.pinned)
        except RuntimeError as err:  # out of host memory, or over the pinnable limit (ulimit -l, cgroups)
            kind = "pinned " if self.pinned else ""
            raise InvalidArgumentError(
                f"cannot allocate {nbytes} bytes ({nbytes / 2**30:.2f} GiB) of {kind}host memory for "
                f"{self.num_host_blocks} host blocks of {self.bytes_per_block} bytes: {err}; use fewer host "
                "blocks (kvpool plan --host-kv-gib N sizes them)") from err

    def memory_bytes(self) -> int:
        """Bytes of the host buffer: ``num_host_blocks * bytes_per_block``."""
        return self.num_host_blocks * self.bytes_per_block

    def _checked(self, i) -> int:
        i = as_int(i, "host block id")
        if not 0 <= i < self.num_host_blocks:
            raise BlockIndexError(f"host block {i} is outside [0, {self.num_host_blocks}): the host tier has "
                                  f"{self.num_host_blocks} blocks")
        return i

    def block(self, i) -> torch.Tensor:
        """Host block ``i``'s row: a ``[bytes_per_block]`` uint8 view of ``buffer``."""
        return self.buffer[self._checked(i)]

    def rows(self, i) -> list:
        """Host block ``i`` as one view per block tensor: ``rows(i)[k]`` has ``t_k[b]``'s shape and dtype."""
        row, views, start = self.block(i), [], 0
        for dtype, shape, nbytes in self._rows:
            views.append(row[start:start + nbytes].view(dtype).view(shape))
            start += nbytes
        return views

    def __repr__(self) -> str:
        return (f"HostPages({self.num_host_blocks} blocks x {self.bytes_per_block} bytes, "
                f"{self.memory_bytes() / 2**30:.2f} GiB, {'pinned' if self.pinned else 'pageable'})")


__all__ = ["HostPages"]
