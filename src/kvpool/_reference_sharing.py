"""Sharing blocks in `ReferenceBlockTables`: fork, the copy-on-write queue, and free.

A fork shares every block of every KV-cache group (one more reference each); the first write into a
shared partial last block copies it (`_reference_append` plans it) and queues ``(src, dst)`` here; the
queue holds a reference on both blocks until `pop_copies`.
"""
from __future__ import annotations

import numpy as np
import torch

from ._reference_ids import norm_id
from .errors import InvalidArgumentError


class SharingMixin:
    """`fork`, `free` and the copy-on-write queue of `ReferenceBlockTables` (which holds the state they change)."""

    def _queue_copy(self, src: int, dst: int) -> None:
        """Queue a copy-on-write; the sequence's reference on src passes to the queue."""
        self._copies.append((src, dst))
        self._queued[src] = self._queued.get(src, 0) + 1
        self._queued[dst] = self._queued.get(dst, 0) + 1

    def fork(self, parent, child) -> None:
        """Make `child` a copy of `parent` sharing all its blocks, every group's (beam search, parallel sampling).

        The parent must have all its tokens computed (`mark_computed`), so no shared block is ever
        written by two sequences; the first `append` on either side copies a shared partial block.
        """
        seq = self._get(parent)
        child = norm_id(child)
        if child in self._seqs:
            raise InvalidArgumentError(f"fork target seq_id {child!r} already exists: pick a new id")
        if seq.num_computed != seq.num_tokens:
            raise InvalidArgumentError(
                f"fork({parent!r}, {child!r}): parent has {seq.num_tokens - seq.num_computed} tokens not yet "
                "computed; run the forward and mark_computed() first so no shared block is written twice")
        self.allocator.incref(np.array(seq.held(), dtype=np.int32))
        twin = seq.clone()
        seq.shared_tail = twin.shared_tail = seq.num_tokens % self.block_size != 0
        self._seqs[child] = twin

    def free(self, seq_id) -> None:
        """Release `seq_id`'s blocks in one call, position by position (its prefix stays cached longest)."""
        seq = self._get(seq_id)
        self.allocator.free(np.array(seq.held(), dtype=np.int32))
        del self._seqs[norm_id(seq_id)]

    def relocate_top(self, n: int):
        """`BlockTables.relocate_top`: the allocator moves the held top blocks, every name of them is rewritten."""
        tier = getattr(self, "tier", None)  # a host tier (ReferenceTieredTables): its copies name GPU blocks
        if tier is not None and isinstance(n, int) and 0 <= n <= self.allocator.num_blocks:
            low = self.allocator.num_blocks - n
            busy = sum(g >= low for e in tier.batches.values() if not e["done"][True] for _, g in e["reloads"])
            busy += sum(g >= low for e in tier.batches.values() if not e["done"][False] for g, _ in e["offloads"])
            if busy:
                raise InvalidArgumentError(f"relocate_top(): {busy} host-tier copies in flight read or write blocks "
                                           f"among the top {n} ids; complete them first")
        src, dst = self.allocator.relocate_top(n)
        moved = dict(zip(src.tolist(), dst.tolist()))
        if tier is not None:  # queued transfers are renamed; none in flight touches a moved block
            tier.reloads = [(h, moved.get(g, g)) for h, g in tier.reloads]
            tier.offloads = [(moved.get(g, g), h) for g, h in tier.offloads]
        for seq in self._seqs.values():
            seq.tables = [[moved.get(b, b) for b in blocks] for blocks in seq.tables]
        self._copies = [(moved.get(a, a), moved.get(b, b)) for a, b in self._copies]
        queued = {}
        for b, refs in self._queued.items():
            queued[moved.get(b, b)] = queued.get(moved.get(b, b), 0) + refs
        self._queued = queued
        return torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device)

    @property
    def pending_copies(self) -> list:
        """Queued copy-on-write ``(src, dst)`` pairs; the queue holds one reference on each block."""
        return list(self._copies)

    def pop_copies(self):
        """Take the queued copy-on-write pairs.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``src [n] int64`` and ``dst [n] int64`` block ids on the device, for
            ``copy_blocks(caches, src, dst)``, which must run before the next forward pass writes.
        """
        pairs, self._copies, self._queued = self._copies, [], {}
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if len(pairs):
            self.allocator.free(arr.reshape(-1).astype(np.int32))  # drop the queue's references
        return torch.from_numpy(arr[:, 0].copy()).to(self.device), torch.from_numpy(arr[:, 1].copy()).to(self.device)
