"""Bulk block copies between the GPU pages and the host pages, through a block-major staging buffer.

One direction, one round (at most ``staging_blocks`` blocks)::

    offload:  GPU pages --stage_blocks (1 Triton launch)--> staging --1 copy_ per host run--> host pages
    reload:   host pages --1 copy_ per host run--> staging --unstage_blocks (1 Triton launch)--> GPU pages

A run is a stretch of consecutive host ids: the pairs are sorted by host id first, so a step's blocks
written to consecutive host blocks move as one large copy at the link's speed.

Streams (CUDA):
- ``offload`` records an event on the current (compute) stream and enqueues its work on a side stream
  that waits for that event: the copy reads what the step wrote, and the compute stream goes on at once.
- ``reload`` enqueues on the current stream, so a forward enqueued after it sees the blocks.
- Each call also waits (on the device, never on the host) for any copy still in flight that touches the
  same GPU or host blocks in a conflicting way, so a host block is never read while being written and a GPU
  block being offloaded is not overwritten by a reload. (Kernels writing a GPU block while its offload is in
  flight is the protocol's to prevent: such blocks are not handed out until ``done()``.)
Two staging buffers (one per direction) keep the directions independent. On CPU tensors the same code
runs with plain synchronous copies and every ticket is done at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._arrays import as_int
from ..errors import BlockIndexError, InvalidArgumentError
from ..kernels.backend import use_triton
from ..kernels.block_stage import bytes_per_block, stage_blocks, unstage_blocks
from ..kernels.ids import exact_int


@dataclass(eq=False)
class CopyTicket:
    """One enqueued batch of block copies.

    Attributes
    ----------
    kind : str
        ``"offload"`` (GPU -> host) or ``"reload"`` (host -> GPU).
    gpu_ids, host_ids : tuple of int
        The pairs as given (``gpu_ids[i] <-> host_ids[i]``).
    nbytes : int
        Bytes moved: ``len(gpu_ids) * bytes_per_block``.
    rounds : int
        Staging rounds (one kernel launch each).
    copies : int
        Host <-> staging ``copy_`` calls (one per run of consecutive host ids per round).
    """

    kind: str
    gpu_ids: tuple
    host_ids: tuple
    nbytes: int
    rounds: int = 0
    copies: int = 0
    event: object = None  # torch.cuda.Event recorded after the last copy; None on CPU (done at once)
    _keep: list = field(default_factory=list, repr=False)  # tensors the enqueued work reads

    @property
    def num_blocks(self) -> int:
        return len(self.gpu_ids)

    def done(self) -> bool:
        """True once every copy of the batch has finished (an event query: never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block the calling thread until the batch has finished."""
        if self.event is not None:
            self.event.synchronize()


def _ids(name: str, ids, bound: int, where: str) -> list:
    """``ids`` (sequence of ints, numpy array or CPU int tensor) as a list of ints in ``[0, bound)``."""
    if isinstance(ids, torch.Tensor):
        if ids.is_cuda or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise InvalidArgumentError(f"{name} must be a 1-D int32/int64 CPU tensor or a list of ints, got "
                                       f"{tuple(ids.shape)} {ids.dtype} on {ids.device}: ids come from the "
                                       "allocators, on the host")
        ids = ids.tolist()
    elif isinstance(ids, np.ndarray):  # pop_transfers()'s int32 arrays
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{name} must be a 1-D integer array, got {ids.ndim}-D {ids.dtype}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidArgumentError(f"{name} must be a sequence of block ids, got {ids!r}")
    out = []
    for i, x in enumerate(ids):
        v = exact_int(x)
        if v is None:
            raise InvalidArgumentError(f"{name}[{i}]={x!r} is not an integer block id")
        if not 0 <= v < bound:
            raise BlockIndexError(f"{name}[{i}]={v} is outside [0, {bound}): the {where} has {bound} blocks")
        out.append(v)
    return out


def _distinct(name: str, ids: list) -> None:
    if len(set(ids)) != len(ids):
        dup = next(x for i, x in enumerate(ids) if x in ids[:i])
        raise BlockIndexError(f"{name} names block {dup} twice: each destination block is written once per batch")


def host_runs(host_ids: list) -> list:
    """``(first position, first host id, length)`` of each run of consecutive host ids, in order.

    >>> host_runs([4, 5, 6, 9, 10, 2])
    [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    """
    runs = []
    for j, h in enumerate(host_ids):
        if runs and runs[-1][1] + runs[-1][2] == h:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((j, h, 1))
    return runs


class BlockCopier:
    """Moves whole blocks between a cache's GPU pages and its :class:`~kvpool.tier.HostPages`.

    Parameters
    ----------
    cache : PagedKVCache
        The pages (``block_tensors()``, ``num_blocks``, ``device``).
    host_pages : HostPages
        Host pages of the same geometry (same ``bytes_per_block``).
    staging_blocks : int
        Blocks per round; each direction has a staging buffer of ``staging_blocks * bytes_per_block``
        bytes on the cache's device (``staging_bytes`` for both). A batch larger than this goes in rounds.
    metrics : HostTierMetrics, optional
        Counts offloaded/reloaded blocks and bytes as they are enqueued.

    Raises
    ------
    InvalidArgumentError
        ``staging_blocks`` not a positive integer, or host pages of another geometry.
    """

    def __init__(self, cache, host_pages, staging_blocks: int = 64, metrics=None):
        staging_blocks = as_int(staging_blocks, "staging_blocks")
        if staging_blocks < 1:
            raise InvalidArgumentError(f"staging_blocks={staging_blocks} must be >= 1 (blocks per copy round; "
                                       "64 covers a typical step)")
        self._tensors = cache.block_tensors()
        width = bytes_per_block(self._tensors)
        if host_pages.bytes_per_block != width:
            raise InvalidArgumentError(f"host pages hold {host_pages.bytes_per_block} bytes per block but the cache "
                                       f"{width}: build HostPages(cache, n) from this cache")
        self.cache, self.host, self.staging_blocks, self.metrics = cache, host_pages, staging_blocks, metrics
        self.num_blocks, self.bytes_per_block = self._tensors[0].shape[0], width
        self.device = self._tensors[0].device
        self._on_cuda = self.device.type == "cuda"
        shape = (staging_blocks, width)
        self._staging = {kind: torch.empty(shape, dtype=torch.uint8, device=self.device)
                         for kind in ("offload", "reload")}
        self._side = torch.cuda.Stream(device=self.device) if self._on_cuda else None
        self._pending: list = []  # tickets maybe still in flight (CUDA only)
        self._tables = self._kernel_tables()

    def _kernel_tables(self) -> list:
        """Build the staging kernel's layout tables now, on the current stream, and keep them alive: built
        lazily, the first one would be created (a synchronising copy) inside a copy on the side stream."""
        if not (self._on_cuda and use_triton(*self._tensors)):
            return []
        from ..kernels.block_stage_kernel import layout_table  # noqa: PLC0415 (triton only on CUDA)
        return [layout_table(self._tensors, staging) for staging in self._staging.values()]

    @property
    def staging_bytes(self) -> int:
        """Device bytes of the two staging buffers: ``2 * staging_blocks * bytes_per_block``."""
        return 2 * self.staging_blocks * self.bytes_per_block

    # ----------------------------------------------------------------- public
    def offload(self, gpu_ids, host_ids) -> CopyTicket:
        """Copy GPU blocks ``gpu_ids[i]`` to host blocks ``host_ids[i]`` on the side stream.

        Ordered after everything enqueued so far on the current stream (the step that wrote the blocks).
        ``host_ids`` distinct. Bad ids raise :class:`BlockIndexError` / :class:`InvalidArgumentError`
        before anything is enqueued.
        """
        gpu, host = self._checked_pairs(gpu_ids, host_ids)
        _distinct("host_ids", host)
        ticket = CopyTicket("offload", tuple(gpu), tuple(host), len(gpu) * self.bytes_per_block)
        if not gpu:
            return ticket
        if self._on_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self._side.wait_event(ready)
            with torch.cuda.stream(self._side):
                self._run(ticket, self._side)
        else:
            self._run(ticket, None)
        if self.metrics is not None:
            self.metrics.record_offload(ticket.num_blocks, ticket.nbytes)
        return ticket

    def reload(self, host_ids, gpu_ids) -> CopyTicket:
        """Copy host blocks ``host_ids[i]`` into GPU blocks ``gpu_ids[i]`` on the current stream.

        A forward enqueued on this stream afterwards reads the blocks. ``gpu_ids`` distinct. Bad ids raise
        before anything is enqueued.
        """
        gpu, host = self._checked_pairs(gpu_ids, host_ids)
        _distinct("gpu_ids", gpu)
        ticket = CopyTicket("reload", tuple(gpu), tuple(host), len(gpu) * self.bytes_per_block)
        if not gpu:
            return ticket
        self._run(ticket, torch.cuda.current_stream(self.device) if self._on_cuda else None)
        if self.metrics is not None:
            self.metrics.record_reload(ticket.num_blocks, ticket.nbytes)
        return ticket

    def synchronize(self) -> None:
        """Wait (host) for every copy in flight."""
        for ticket in self._pending:
            ticket.wait()
        self._pending = []

    # ----------------------------------------------------------------- internals
    def _checked_pairs(self, gpu_ids, host_ids) -> tuple:
        gpu = _ids("gpu_ids", gpu_ids, self.num_blocks, "GPU cache")
        host = _ids("host_ids", host_ids, self.host.num_host_blocks, "host tier")
        if len(gpu) != len(host):
            raise InvalidArgumentError(f"{len(gpu)} gpu_ids but {len(host)} host_ids: pass one host block per "
                                       "GPU block")
        return gpu, host

    def _wait_for_conflicts(self, ticket: CopyTicket, stream) -> None:
        """Make ``stream`` wait (on the device) for pending tickets that use the same staging buffer, write
        what ``ticket`` touches, or read what it writes."""
        self._pending = [t for t in self._pending if not t.done()]
        reads, writes = _footprint(ticket)
        for other in self._pending:
            o_reads, o_writes = _footprint(other)
            # same kind: it shares the staging buffer (a no-op wait when already on one stream)
            if other.kind == ticket.kind or o_writes & (reads | writes) or o_reads & writes:
                stream.wait_event(other.event)

    def _run(self, ticket: CopyTicket, stream) -> None:
        """Enqueue ``ticket``'s rounds on ``stream`` (``None``: CPU, synchronous)."""
        order = sorted(range(ticket.num_blocks), key=lambda i: ticket.host_ids[i])  # longest host runs
        gpu = [ticket.gpu_ids[i] for i in order]
        host = [ticket.host_ids[i] for i in order]
        ids = torch.tensor(gpu, dtype=torch.int32)
        if stream is not None:
            self._wait_for_conflicts(ticket, stream)
            ids = ids.pin_memory().to(self.device, non_blocking=True)  # a pageable copy would sync the stream
        staging = self._staging[ticket.kind]
        for r0 in range(0, len(gpu), self.staging_blocks):
            r1 = min(r0 + self.staging_blocks, len(gpu))
            self._round(ticket, ids[r0:r1], host[r0:r1], staging)
        if stream is not None:
            ticket.event = torch.cuda.Event()
            ticket.event.record(stream)
            ticket._keep.append(ids)
            self._pending.append(ticket)

    def _round(self, ticket: CopyTicket, ids: torch.Tensor, host: list, staging: torch.Tensor) -> None:
        """One round: at most ``staging_blocks`` blocks through the staging rows ``[0, len(host))``."""
        n, async_ = len(host), self._on_cuda
        if ticket.kind == "offload":
            stage_blocks(self._tensors, ids, staging[:n])
        for j, h, length in host_runs(host):
            dst, src = self.host.buffer[h:h + length], staging[j:j + length]
            if ticket.kind == "offload":
                dst.copy_(src, non_blocking=async_)
            else:
                src.copy_(dst, non_blocking=async_)
            ticket.copies += 1
        if ticket.kind == "reload":
            unstage_blocks(staging[:n], self._tensors, ids)
        ticket.rounds += 1


def _footprint(ticket: CopyTicket) -> tuple:
    """``(reads, writes)`` of a ticket as sets of ``("gpu" | "host", id)``."""
    gpu, host = {("gpu", b) for b in ticket.gpu_ids}, {("host", h) for h in ticket.host_ids}
    return (gpu, host) if ticket.kind == "offload" else (host, gpu)


__all__ = ["BlockCopier", "CopyTicket", "host_runs"]
