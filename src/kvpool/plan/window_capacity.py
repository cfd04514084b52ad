"""How many requests a hybrid pool holds when windowed groups give back what leaves their window.

A request of ``L`` tokens, all computed (the decode state: the next query is at position ``L``), holds in
every full-attention group ``ceil(L / block_size)`` blocks, and in a group with window ``W`` only the
blocks of the tokens a query at position ``L`` still reads, ``[L - W + 1, L)`` (`kvpool.BlockTables`
releases the rest: issue 13's rule ``(j + 1) * block_size <= num_computed - W + 1``). Every block id spans
one page in each of the pool's ``group_size`` slots, so the pool's ``num_blocks`` serve all groups alike
and ``max_concurrency = num_blocks / blocks_per_request``.

>>> # Gemma-3-27B-like: 1 full + 6 windowed (1,024) groups, 32,768-token requests, blocks of 16
>>> per_request_blocks((None,) + (1024,) * 6, 32_768, 16)
2432
>>> # full: 2,048 blocks; each windowed group: tokens 31,745..32,767 -> blocks 1,984..2,047 = 64
"""
from __future__ import annotations

from dataclasses import dataclass


def window_blocks(window: int | None, num_tokens: int, block_size: int) -> int:
    """Blocks one group holds for a sequence of ``num_tokens`` computed tokens (window None: every block)."""
    if num_tokens <= 0:
        return 0
    if window is None or window >= num_tokens + 1:
        return -(-num_tokens // block_size)
    first = max(0, num_tokens - window + 1)  # the oldest token a query at position num_tokens reads
    return (num_tokens - 1) // block_size - first // block_size + 1


def per_request_blocks(group_windows, num_tokens: int, block_size: int) -> int:
    """Blocks of all groups one request of ``num_tokens`` computed tokens holds."""
    return sum(window_blocks(w, num_tokens, block_size) for w in group_windows)


@dataclass(frozen=True)
class WindowCapacity:
    """Requests of ``max_model_len`` tokens one GPU's KV bytes hold: the hybrid pool with window freeing,
    and the single-table pool kvpool used before (every layer keeps every token), beside it.

    Attributes
    ----------
    num_blocks, blocks_per_request : int
        The hybrid pool's blocks (``kv_bytes // (group_size * page_bytes)``) and what one request holds
        in all its groups.
    num_blocks_full, blocks_per_request_full : int
        The same bytes as one table of every layer (``kv_bytes // (num_layers * page_bytes)``), and
        ``ceil(max_model_len / block_size)``.
    num_groups, group_size : int
        KV-cache groups, and the slots (one layer page each) a block spans.
    """

    num_blocks: int
    blocks_per_request: int
    num_blocks_full: int
    blocks_per_request_full: int
    num_groups: int = 1
    group_size: int = 1

    @property
    def max_concurrency(self) -> float:
        return self.num_blocks / self.blocks_per_request

    @property
    def max_concurrency_full(self) -> float:
        return self.num_blocks_full / self.blocks_per_request_full

    @property
    def gain(self) -> float:
        """Requests held with window freeing over the single-table pool's."""
        return self.max_concurrency / self.max_concurrency_full

    def to_dict(self) -> dict:
        return {"num_groups": self.num_groups, "group_size": self.group_size,
                "num_blocks": self.num_blocks, "blocks_per_request": self.blocks_per_request,
                "max_concurrency": round(self.max_concurrency, 2), "num_blocks_full": self.num_blocks_full,
                "blocks_per_request_full": self.blocks_per_request_full,
                "max_concurrency_full": round(self.max_concurrency_full, 2), "gain": round(self.gain, 3)}


def window_capacity(groups, page_bytes: int, kv_bytes: int, max_model_len: int, block_size: int) -> WindowCapacity:
    """`WindowCapacity` of ``kv_bytes`` for a model's `KVGroups` (``page_bytes``: one layer's block)."""
    return WindowCapacity(
        num_blocks=max(0, kv_bytes) // (groups.group_size * page_bytes),
        blocks_per_request=per_request_blocks(groups.windows, max_model_len, block_size),
        num_blocks_full=max(0, kv_bytes) // (groups.num_layers * page_bytes),
        blocks_per_request_full=-(-max_model_len // block_size),
        num_groups=len(groups.groups), group_size=groups.group_size)


__all__ = ["WindowCapacity", "window_capacity", "window_blocks", "per_request_blocks"]
