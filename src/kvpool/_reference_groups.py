"""KV-cache groups of `ReferenceBlockTables`: their windows, the window rule, and each group's hashes and salt.

A hybrid model's layers fall into groups (`kvpool.plan.kv_groups`): full attention (window None) or a
sliding window of W tokens. Every group keeps its own block list per sequence, all drawn from ONE
allocator. The kernels read, for a query at position p, the tokens t >= p + 1 - W, so once a
sequence has ``num_computed`` tokens (the next query's position) a windowed group gives back block j
as soon as ``(j + 1) * block_size <= num_computed - W + 1``: after that the group holds at most
``ceil((W - 1) / block_size) + 1`` blocks of computed tokens.

>>> released_blocks(num_computed=45, window=32, block_size=16)  # 45 - 32 + 1 = 14 < 16: block 0 still read
0
>>> released_blocks(num_computed=47, window=32, block_size=16)  # 47 - 32 + 1 = 16: tokens 0..15 all out
1

Group g's block hashes and salt differ from every other group's (group 0 keeps the single-group
values), so a block of one group, which holds other layers' pages, can never serve another group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import split_key
from ._reference import K1, K2, K3, MASK, _mix64
from .errors import InvalidArgumentError

def _tag(group: int, k0: int) -> int:
    return _mix64(K3 ^ (group * K1 & MASK) ^ k0)


def group_hash(block_hash: int, group: int, key: int = 0) -> int:
    """Group `group`'s hash of a block whose group-0 hash is `block_hash`, under the 128-bit `key`.

    ``mix64(h ^ tag(g) ^ k1)`` with ``tag(g) = mix64(K3 ^ g * K1 ^ k0)``; group 0 keeps `block_hash`.
    """
    k0, k1 = split_key(key)
    return block_hash if group == 0 else _mix64(block_hash ^ _tag(group, k0) ^ k1)


def group_context(context: int, group: int, key: int = 0) -> int:
    """Group `group`'s salt digest, which its verified entries carry: ``mix64(c * K2 ^ tag(g) ^ k1)``.

    Group 0 keeps `context`; a hit compares the salt digest, so no group's block ever serves another.
    """
    k0, k1 = split_key(key)
    return context if group == 0 else _mix64((context * K2 & MASK) ^ _tag(group, k0) ^ k1)


def released_blocks(num_computed: int, window: int | None, block_size: int) -> int:
    """Leading blocks wholly before the window of the query at position `num_computed` (0 for full attention)."""
    if window is None:
        return 0
    return max(0, (num_computed - window + 1) // block_size)


def check_group_windows(group_windows) -> tuple:
    """``group_windows`` as a tuple of None / int >= 1; None is one full-attention group."""
    if group_windows is None:
        return (None,)
    if isinstance(group_windows, (str, bytes)) or not hasattr(group_windows, "__iter__"):
        raise InvalidArgumentError(f"group_windows={group_windows!r} must be a sequence with one entry per KV-cache "
                                   "group: None (full attention) or a window in tokens, e.g. kv_groups(...).windows")
    windows = tuple(group_windows)
    if not windows:
        raise InvalidArgumentError("group_windows=() names no group; pass None (one full-attention group) or "
                                   "one entry per group")
    for g, w in enumerate(windows):
        if w is None:
            continue
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or w < 1:
            raise InvalidArgumentError(f"group_windows[{g}]={w!r} must be None (full attention) or a window "
                                       "of >= 1 tokens")
    return tuple(None if w is None else int(w) for w in windows)


@dataclass(frozen=True)
class GroupLayout:
    """The groups of one `ReferenceBlockTables`.

    Attributes
    ----------
    windows : tuple of (int or None)
        Each group's window in tokens (None: full attention).
    """

    windows: tuple

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def single_full(self) -> bool:
        """One full-attention group: the single-table behaviour, call for call."""
        return self.windows == (None,)

    @property
    def reference(self) -> int | None:
        """The first full group, whose chain anchors every windowed group's entries (None: no full group)."""
        return next((g for g, w in enumerate(self.windows) if w is None), None)

    def anchored(self, group: int) -> bool:
        """Group `group`'s entry for block j hangs on the reference group's chain after block j - 1."""
        return self.windows[group] is not None and self.reference is not None

    def chained(self) -> list:
        """Groups whose entries chain on their own blocks (hits walk them from the first block), in order."""
        return [g for g in range(self.num_groups) if not self.anchored(g)]

    def anchors(self) -> list:
        """Windowed groups anchored on the reference chain, in order."""
        return [g for g in range(self.num_groups) if self.anchored(g)]

    def released(self, group: int, num_computed: int, block_size: int) -> int:
        """Leading positions group `group` does not hold once `num_computed` tokens are computed."""
        return released_blocks(num_computed, self.windows[group], block_size)
