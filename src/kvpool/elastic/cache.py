"""`ElasticKVCache`: the pages of one TP shard over a reserved virtual range, mapped as the pool grows.

The same views as `kvpool.PagedKVCache` (``k_caches``, ``v_caches``, fp8 ``k_scales``/``v_scales``, MLA
latents, hybrid slots, ``block_tensors()``), carved by the same code (``cache.PagedKVCache._carve``), but
every block tensor sits in its own region of one ``_C.VirtualRange`` (`kvpool.elastic.regions`) and spans
``max_num_blocks`` rows at an address that never changes: kernels and captured CUDA graphs keep working
across `resize`, `release` and `remap`. Only rows ``[0, num_blocks)`` are backed by memory; the
allocator (`kvpool.ElasticKVPool` keeps it in step) hands out no other id.
"""
from __future__ import annotations

import torch

from ..cache import PagedKVCache, _Bytes, _checked_shard, _Shard
from ..errors import InvalidArgumentError, KVPoolError
from .memory import granularity, range_tensor, reserve
from .regions import RegionLayout


class _RowRecorder:
    """A carver that only records each tensor's bytes per block (the regions are laid out from them)."""

    def __init__(self, rows: int):
        self.rows, self.offset, self.row_bytes = rows, 0, []

    def take(self, nbytes: int, dtype, shape) -> None:
        assert shape[0] == self.rows and nbytes % self.rows == 0, (nbytes, shape)
        self.row_bytes.append(nbytes // self.rows)
        self.offset += nbytes


class _RegionCarver:
    """Hands out each tensor at the start of the next region of ``layout`` (views of the range tensor)."""

    def __init__(self, base: torch.Tensor, layout: RegionLayout):
        self.base, self.layout, self.offset, self.index = base, layout, 0, 0

    def take(self, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        region = self.layout.regions[self.index]
        assert nbytes == region.row_bytes * self.layout.max_num_blocks, (nbytes, region)
        view = self.base.narrow(0, region.offset, nbytes).view(dtype).view(shape)
        self.index, self.offset = self.index + 1, self.offset + nbytes
        return view


class ElasticKVCache(PagedKVCache):
    """A `PagedKVCache` whose pages grow and shrink in place (build it with `for_shard`).

    Attributes (beyond `PagedKVCache`'s)
    ----------
    num_blocks : int
        Blocks backed by memory now: ids ``[0, num_blocks)``.
    max_num_blocks : int
        Rows every block tensor spans (``k_caches[i].shape[0]``): the reserved capacity.
    regions : RegionLayout
        Each block tensor's region of the range, in carving order (``K_0, V_0, K_1, ...``, then the
        per-token scales), the order of the tensors' addresses.
    """

    def __init__(self, shard: _Shard, nbytes: _Bytes, num_blocks: int = 0):
        recorder = _RowRecorder(shard.num_blocks)
        self._carve(recorder, shard, nbytes)  # a dry run: the tensors' row sizes, in carving order
        self.regions = RegionLayout.of(recorder.row_bytes, shard.num_blocks, granularity(shard.device))
        self._range = reserve(self.regions.reserved_bytes, shard.device)
        if int(self._range.granularity) != self.regions.granularity:
            raise KVPoolError(f"the range's granularity {self._range.granularity} differs from the "
                              f"{self.regions.granularity} the regions were laid out with")
        self._device = shard.device
        self._base = range_tensor(self._range, shard.device)
        self._carve(_RegionCarver(self._base, self.regions), shard, nbytes)
        scales = {id(t) for t in self._scale_tensors}
        by_address = sorted(self._block_tensors, key=lambda t: t.data_ptr())  # the carving order: region order
        self._tensor_regions = [(t, r, id(t) in scales) for t, r in zip(by_address, self.regions.regions, strict=True)]
        self._fresh_is_zero = shard.device.type == "cpu"  # the host backend maps zero pages; CUDA's are undefined
        self.max_num_blocks, self.num_blocks, self.asleep = shard.num_blocks, 0, False
        self.resize(num_blocks)

    @classmethod
    def for_shard(cls, spec, max_num_blocks: int, block_size: int, tp_rank: int, tp_size: int, device,
                  dtype=None, kv_dtype="auto", layout: str = "NHD", fp8_scales: str = "per_token_head", *,
                  num_blocks: int = 0) -> "ElasticKVCache":
        """Reserve the pages of TP rank `tp_rank` for `max_num_blocks` blocks and map `num_blocks` of them.

        The arguments are `PagedKVCache.for_shard`'s, with ``max_num_blocks`` (the capacity: every rank of the
        group passes the same) in place of ``num_blocks``; ``device`` ``"cpu"`` uses the host backend (mmap),
        ``"cuda"`` the driver's virtual memory. Reserving costs address space only.

        Raises
        ------
        InvalidArgumentError
            A bad argument (as `PagedKVCache.for_shard`), or ``num_blocks`` outside ``[0, max_num_blocks]``.
        KVPoolError
            The backend is unavailable (CUDA without ``libcuda.so.1``) or the reservation failed.
        """
        from ..plan.model import load_model_spec  # noqa: PLC0415

        shard, nbytes = _checked_shard(load_model_spec(spec), max_num_blocks, block_size, tp_rank, tp_size, device,
                                       dtype, kv_dtype, layout, fp8_scales)
        _check_count(num_blocks, shard.num_blocks, "num_blocks")
        return cls(shard, nbytes, int(num_blocks))

    # ----------------------------------------------------------------- memory
    def resize(self, num_blocks: int) -> None:
        """Map (or unmap) the chunks so that exactly the rows ``[0, num_blocks)`` of every tensor are backed.

        Low level: `kvpool.ElasticKVPool` calls it with the allocator kept in step (never shrink below a
        held block). New rows read as a fresh `PagedKVCache` (pages 0, per-token fp8 scales 1.0). All or
        nothing: when a map fails (out of memory) what this call mapped is unmapped again and it raises.
        """
        num_blocks = _check_count(num_blocks, self.max_num_blocks, "resize(): num_blocks")
        self._check_awake("resize")
        old = self.num_blocks
        runs = self.regions.changes(old, num_blocks)
        if num_blocks < old:
            for offset, size in runs:
                self._range.unmap(offset, size)
        else:
            self._map_runs(runs)
            self._initialise_rows(old, num_blocks, mapped_before=old)
        self.num_blocks = num_blocks

    def _map_runs(self, runs) -> None:
        done = []
        try:
            for offset, size in runs:
                self._range.map(offset, size)
                done.append((offset, size))
        except BaseException:
            for offset, size in done:
                self._range.unmap(offset, size)
            raise

    def _initialise_rows(self, first: int, end: int, mapped_before: int) -> None:
        """Rows ``[first, end)``: pages zero and per-token scales 1.0, as `PagedKVCache` starts.

        A shrink leaves stale rows in the chunks it keeps, and CUDA's fresh chunks hold garbage; the host
        backend's fresh chunks are zero already, so there only the page rows in chunks that were mapped for
        ``mapped_before`` blocks are cleared (touching fresh pages would fault every one of them in).
        """
        for t, region, is_scale in self._tensor_regions:
            if is_scale:
                t[first:end].fill_(1.0)
                continue
            stop = end
            if self._fresh_is_zero:  # rows past the old mapped span lie in fresh zero chunks
                span = self.regions.mapped_span(region, mapped_before)
                stop = min(end, -(-span // region.row_bytes))
            if stop > first:
                t[first:stop].zero_()

    def release(self) -> None:
        """Sleep: unmap every chunk (contents dropped); addresses and ``num_blocks`` stay for `remap`."""
        self._check_awake("release")
        self._range.release_all()
        self.asleep = True

    def remap(self) -> None:
        """Wake: map again, at the same addresses, the chunks of the ``num_blocks`` rows; they read as new."""
        if not self.asleep:
            raise InvalidArgumentError("remap(): the cache is not asleep (call release() first)")
        self._range.remap_all()
        self.asleep = False
        self._initialise_rows(0, self.num_blocks, mapped_before=0)

    def _check_awake(self, fn: str) -> None:
        if self.asleep:
            raise InvalidArgumentError(f"{fn}(): the cache is asleep (released); call remap() first")

    # ----------------------------------------------------------------- accessors
    @property
    def mapped_bytes(self) -> int:
        """Physical bytes mapped now (``regions.mapped_bytes(num_blocks)``; 0 asleep)."""
        return int(self._range.mapped_bytes)

    @property
    def reserved_bytes(self) -> int:
        """Virtual address space of the range (``regions.reserved_bytes``)."""
        return int(self._range.reserved_bytes)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def buffer(self) -> torch.Tensor:
        raise KVPoolError("an elastic cache has no single buffer: each block tensor has its own region of the "
                          "range (block_tensors(), regions)")

    def memory_bytes(self) -> int:
        """Bytes of the ``num_blocks`` blocks (``bytes_per_block * num_blocks``, the static pool's figure);
        `mapped_bytes` adds each region's last partial chunk."""
        return self.regions.bytes_per_block * self.num_blocks

    def __repr__(self) -> str:
        static = super().__repr__().removeprefix("PagedKVCache(").removesuffix(")")
        return (f"ElasticKVCache({static}, of max {self.max_num_blocks} blocks, {self.mapped_bytes / 2**20:.1f} "
                f"MiB mapped{', asleep' if self.asleep else ''})")


def _check_count(n, limit: int, what: str) -> int:
    if isinstance(n, bool) or not hasattr(n, "__index__") or not 0 <= int(n) <= limit:
        raise InvalidArgumentError(f"{what}={n!r} must be an int in [0, {limit}] (max_num_blocks={limit})")
    return int(n)
