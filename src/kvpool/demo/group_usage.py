"""Blocks held per KV-cache group, against what one table of every token (full attention) would hold.

A hybrid model's windowed group gives back the blocks that leave its window, so per sequence it holds
at most ``ceil((W - 1) / block_size) + 1`` blocks of computed tokens however long the sequence grows,
where a full-attention table holds ``ceil(num_tokens / block_size)``. The engine observes every live
sequence after each step's ``mark_computed`` (every token of every live sequence is then computed),
so the per-sequence figure here is exactly the bound of issue 13.

Counts are summed over sequences (a prefix block shared by two sequences counts twice, in both the
held and the full-attention figure), so the two stay comparable under prefix sharing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GroupUsage:
    """One KV-cache group over a run.

    Attributes
    ----------
    window : int or None
        The group's window in tokens (None: full attention).
    layers : tuple of int
        The model layers whose K/V this group's block table addresses.
    block_size : int
    peak_held, peak_full : int
        Most blocks the live sequences' tables of this group held at once, and most a full-attention
        table (``ceil(num_tokens / block_size)`` per sequence) would have held at once.
    held_block_steps, full_block_steps : int
        The same two figures summed over steps (their ratio is the average saving).
    max_seq_held : int
        Most blocks one sequence's table of this group held after a step.
    """

    window: int | None
    layers: tuple[int, ...]
    block_size: int
    peak_held: int = 0
    peak_full: int = 0
    held_block_steps: int = 0
    full_block_steps: int = 0
    max_seq_held: int = 0

    @property
    def bound_per_seq(self) -> int | None:
        """Issue 13's per-sequence bound of a windowed group, ``ceil((W - 1) / bs) + 1``; None when full.

        >>> # W = 32, bs = 16: ceil(31 / 16) + 1 = 3 blocks (tokens p - 31 .. p span at most 3 blocks)
        """
        return None if self.window is None else -(-(self.window - 1) // self.block_size) + 1

    def observe(self, held_per_seq: list[int], full_per_seq: list[int]) -> None:
        held, full = sum(held_per_seq), sum(full_per_seq)
        self.peak_held, self.peak_full = max(self.peak_held, held), max(self.peak_full, full)
        self.held_block_steps += held
        self.full_block_steps += full
        self.max_seq_held = max([self.max_seq_held, *held_per_seq])

    def describe(self) -> str:
        kind = "full attention" if self.window is None else f"window {self.window}"
        share = 100 * self.held_block_steps / max(1, self.full_block_steps)
        line = (f"{kind} (layers {', '.join(map(str, self.layers))}): peak {self.peak_held} blocks held "
                f"(full attention: {self.peak_full}), {self.held_block_steps} block-steps = {share:.0f}% of "
                f"full attention's {self.full_block_steps}")
        if self.window is not None:
            line += f"; at most {self.max_seq_held} per sequence (bound {self.bound_per_seq})"
        return line


def group_usages(kv_groups, block_size: int) -> list[GroupUsage]:
    """One empty :class:`GroupUsage` per group of ``kv_groups`` (`kvpool.plan.kv_groups.KVGroups`)."""
    return [GroupUsage(g.window, tuple(g.layers), block_size) for g in kv_groups.groups]


def observe_tables(usages: list[GroupUsage], tables, seq_ids) -> None:
    """Count each live sequence's blocks per group in ``tables`` (released positions are -1)."""
    for g, usage in enumerate(usages):
        rows = [np.asarray(tables.blocks(s, group=g)) for s in seq_ids]
        usage.observe([int((r >= 0).sum()) for r in rows], [len(r) for r in rows])
