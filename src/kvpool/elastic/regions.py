"""Where each block tensor of an elastic pool lives in its virtual range, and what growing maps.

An elastic pool keeps the per-layer layout of `kvpool.PagedKVCache` (the kernels are unchanged): every
block tensor (each slot's K and V pages, the per-token fp8 scales) has its own region of the shard's one
reserved range, ``round_up(max_num_blocks * row_bytes, granularity)`` bytes, where ``row_bytes`` is one
block's bytes in that tensor. A pool of ``n`` blocks maps, in every region, the chunks covering rows
``[0, n)``: ``round_up(n * row_bytes, granularity)`` bytes. Pure arithmetic, no torch (docs/elastic.md).

>>> # Llama-3.1-8B, tp=1, bf16, 16-token blocks: row_bytes = 16 x 8 heads x 128 x 2 B = 32 KiB per tensor
>>> layout = RegionLayout.of([32768] * 64, max_num_blocks=100_000, granularity=2 << 20)
>>> layout.blocks_per_chunk(0), layout.mapped_bytes(64) // 2**20, layout.mapped_bytes(65) // 2**20
(64, 128, 256)
"""
from __future__ import annotations

import dataclasses

from ..errors import InvalidArgumentError


def round_up(nbytes: int, granularity: int) -> int:
    """The smallest multiple of ``granularity`` >= ``nbytes``: ``round_up(5, 4) == 8``."""
    return -(-nbytes // granularity) * granularity


@dataclasses.dataclass(frozen=True)
class Region:
    """One block tensor's slice of the range: it starts at ``offset`` and holds ``max_num_blocks`` rows of
    ``row_bytes`` each, padded to ``size`` (a multiple of the granularity)."""

    offset: int
    row_bytes: int
    size: int


@dataclasses.dataclass(frozen=True)
class RegionLayout:
    """The regions of every block tensor of one shard, in carving order (``K_0, V_0, K_1, ...``, scales last).

    Attributes
    ----------
    regions : tuple of Region
    max_num_blocks : int
        Rows each tensor spans (the reserved capacity).
    granularity : int
        Bytes of one physical chunk (2 MiB on the CUDA backend and the host one).
    """

    regions: tuple
    max_num_blocks: int
    granularity: int

    @classmethod
    def of(cls, row_bytes, max_num_blocks: int, granularity: int) -> "RegionLayout":
        """Regions for tensors whose rows take ``row_bytes[i]`` bytes, laid end to end from offset 0."""
        if granularity <= 0 or max_num_blocks < 0:
            raise InvalidArgumentError(f"granularity={granularity} and max_num_blocks={max_num_blocks} must be "
                                       "> 0 and >= 0")
        regions, offset = [], 0
        for rb in row_bytes:
            size = max(granularity, round_up(max_num_blocks * rb, granularity))  # never an empty region
            regions.append(Region(offset, int(rb), size))
            offset += size
        return cls(tuple(regions), int(max_num_blocks), int(granularity))

    @property
    def reserved_bytes(self) -> int:
        """Address space of the whole range: the sum of the regions."""
        return sum(r.size for r in self.regions)

    @property
    def bytes_per_block(self) -> int:
        """One block's bytes over every tensor (the static pool's ``memory_bytes() / num_blocks``)."""
        return sum(r.row_bytes for r in self.regions)

    def mapped_span(self, region: Region, num_blocks: int) -> int:
        """Bytes of ``region`` mapped for a pool of ``num_blocks``: the chunks covering its first rows."""
        return round_up(num_blocks * region.row_bytes, self.granularity)

    def mapped_bytes(self, num_blocks: int) -> int:
        """Physical bytes a pool of ``num_blocks`` blocks maps over all regions."""
        return sum(self.mapped_span(r, num_blocks) for r in self.regions)

    def blocks_per_chunk(self, i: int) -> float:
        """Blocks one chunk of region ``i`` holds (a fraction when a block's row is larger than a chunk)."""
        rb = self.regions[i].row_bytes
        return self.granularity // rb if self.granularity % rb == 0 else self.granularity / rb

    def changes(self, old_blocks: int, new_blocks: int) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` runs to map (growing) or unmap (shrinking) between two pool sizes.

        Growing from ``old_blocks`` to ``new_blocks`` maps, in each region, the chunks between the two
        mapped spans; shrinking unmaps them. Empty runs are left out.
        """
        runs = []
        for r in self.regions:
            a, b = sorted((self.mapped_span(r, old_blocks), self.mapped_span(r, new_blocks)))
            if b > a:
                runs.append((r.offset + a, b - a))
        return runs

    def max_blocks_within(self, num_blocks: int, extra_bytes: int, limit: int) -> int:
        """The largest pool ``n`` in ``[num_blocks, limit]`` with ``mapped_bytes(n) - mapped_bytes(num_blocks)
        <= extra_bytes`` (what a budget of ``extra_bytes`` more allows; ``num_blocks`` if nothing)."""
        base = self.mapped_bytes(num_blocks)
        lo, hi = num_blocks, limit
        while lo < hi:  # mapped_bytes grows with n: bisect
            mid = (lo + hi + 1) // 2
            if self.mapped_bytes(mid) - base <= extra_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo
