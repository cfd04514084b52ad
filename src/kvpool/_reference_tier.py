"""The pure-Python twin of the host tier (``csrc/host_tier.{h,cpp}``, ``csrc/seq_table_host.cpp``).

`ReferenceHostTier` keeps the same bookkeeping over two `ReferenceBlockAllocator` (the GPU's and the host's),
written for clarity; `ReferenceTieredTables` is `ReferenceBlockTables` with it attached: ``add()`` continues a
GPU hit on the host, ``mark_computed()`` offloads what it offered to the GPU cache, ``pop_transfers()`` /
``complete()`` move the queued copies through their batches. The stateful test
(tests/test_host_tier_stateful.py) drives it beside the C++ tables and compares everything after every step.

The rules, once (docs/host_tier.md):
- a host hit is the host allocator's verified walk from the first block (its entries chain on host stamps),
  cut before the first block whose offload is in flight; every walked block is touched (taken and given
  back: the host LRU keeps a prefix in use), the blocks past the GPU hit are held until their reload completes;
- GPU hits the host lacks are offloaded again (the chain goes on), then every block offered to the GPU cache
  is offloaded in order: blocks the host holds under the sequence's chain are skipped, the others take fresh
  host blocks (the block the chain goes on from is taken with them, so the allocation cannot evict it);
- an offload holds its GPU block and its host block (not readable) until complete; a reload holds both too.
"""
from __future__ import annotations

import numpy as np

from ._reference import CHAIN_ROOT
from ._reference_ids import batch_ids, norm_id
from ._reference_tables import ReferenceBlockTables
from .batch_tables import BatchTables
from .errors import InvalidArgumentError

CHAIN_BROKEN = 2**64 - 1


class HostCursor:
    """A sequence's place in the host chain: `cached` leading blocks, the `chain` value after them, the host
    block `last` of the last one (-1: none)."""

    __slots__ = ("cached", "chain", "last")

    def __init__(self, cached=0, chain=CHAIN_ROOT, last=-1):
        self.cached, self.chain, self.last = cached, chain, last

    def copy(self) -> "HostCursor":
        return HostCursor(self.cached, self.chain, self.last)


def _i32(values) -> np.ndarray:
    return np.array(list(values), dtype=np.int32)


class ReferenceHostTier:
    """Queues, holds and in-flight marks of the host tier, over a GPU and a host allocator (twins)."""

    def __init__(self, gpu, host):
        self.gpu, self.host, self.bs = gpu, host, gpu.block_size
        self.in_flight: set = set()  # host blocks an offload is writing
        self.reloads: list = []  # queued (host, gpu)
        self.offloads: list = []  # queued (gpu, host)
        self.batches: dict = {}  # id -> {"reloads": [...], "offloads": [...], "done": {True: bool, False: bool}}
        self.next_batch = 1
        self.unlaunched: set = set()  # popped batches whose reloads are not enqueued yet
        self.counts = dict(host_queries=0, host_hit_blocks=0, offloaded_blocks=0, skipped_blocks=0,
                           dropped_blocks=0, completed_reloads=0, completed_offloads=0)

    def _blocks(self, tokens, first, last):
        return np.array(tokens[first * self.bs:last * self.bs], dtype=np.int32)

    def continue_hit(self, hashes, tokens, context, gpu_hits, gpu_blocks) -> tuple:
        """``(hit blocks, cursor)`` of add(): the GPU's `gpu_hits`, continued over the host's verified chain."""
        self.counts["host_queries"] += 1
        k = len(hashes)
        ids, stamps, collided = self.host.probe_chain(np.array(hashes, dtype=np.uint64), self._blocks(tokens, 0, k),
                                                      context)
        ids, stamps = ids.tolist(), stamps.tolist()
        walked = len(ids)
        readable = next((j for j, b in enumerate(ids) if b in self.in_flight), walked)
        cursor = HostCursor()
        if walked and self.host.take_cached(ids, stamps, 0, k, int(collided)) is not None:
            reload = [(ids[j], gpu_blocks[j]) for j in range(gpu_hits, readable)]
            self.reloads += reload
            self.gpu.incref(_i32(g for _, g in reload))
            self.host.free(_i32(b for j, b in enumerate(ids) if not gpu_hits <= j < readable))
            self.counts["host_hit_blocks"] += len(reload)
            cursor = HostCursor(walked, stamps[-1], ids[-1])
        else:
            readable = 0
        if gpu_hits > cursor.cached:
            self.offload(hashes, tokens, context, gpu_blocks, gpu_hits, cursor)
        return max(gpu_hits, readable), cursor

    def _take_fresh(self, n, cursor) -> list:
        refs = 1 if cursor.last < 0 else int(self.host.refcounts([cursor.last])[0])
        n = min(n, self.host.num_free_blocks - (refs == 0))
        if n <= 0:
            return []
        if cursor.last < 0:
            return self.host.allocate(n).tolist()
        fresh = self.host.take_cached([cursor.last], [cursor.chain], n)
        if fresh is None:  # the block the chain goes on from was evicted: the chain is gone
            return []
        self.host.free([cursor.last])
        return fresh.tolist()

    def offload(self, hashes, tokens, context, gpu_blocks, full, cursor) -> None:
        """Offload blocks ``[cursor.cached, full)`` of one sequence (skipping those the host holds)."""
        first = cursor.cached
        if cursor.chain == CHAIN_BROKEN or first >= full:
            return
        start = first
        while start < full:  # the leading blocks the host holds already under this chain
            ids, stamps, _ = self.host.probe_anchored([hashes[start]], self._blocks(tokens, start, start + 1), context,
                                                      [cursor.chain])
            if len(ids) == 0:
                break
            start += 1
            cursor.cached, cursor.chain, cursor.last = start, int(stamps[0]), int(ids[0])
        self.counts["skipped_blocks"] += start - first
        want = full - start
        if want == 0:
            return
        fresh = self._take_fresh(want, cursor)
        cached = 0
        if fresh:
            chains = self.host.cache_blocks_chained(_i32(fresh), np.array(hashes[start:start + len(fresh)],
                                                                           dtype=np.uint64),
                                                    self._blocks(tokens, start, start + len(fresh)), context,
                                                    cursor.chain).tolist()
            while cached < len(fresh) and chains[cached] != CHAIN_BROKEN:
                cached += 1
            for j in range(cached):
                self.offloads.append((gpu_blocks[start + j], fresh[j]))
                self.in_flight.add(fresh[j])
            self.gpu.incref(_i32(gpu_blocks[start:start + cached]))
            if cached < len(fresh):
                self.host.free(_i32(fresh[cached:]))
        self.counts["offloaded_blocks"] += cached
        self.counts["dropped_blocks"] += want - cached
        if cached:
            cursor.cached, cursor.chain, cursor.last = start + cached, chains[cached - 1], fresh[cached - 1]
        if cached < want:
            cursor.chain = CHAIN_BROKEN

    def pop(self) -> tuple:
        """``(batch, reload_host, reload_gpu, offload_gpu, offload_host)``; batch 0 when nothing was queued."""
        reloads, offloads = self.reloads, self.offloads
        self.reloads, self.offloads = [], []
        batch = 0
        if reloads or offloads:
            batch = self.next_batch
            self.next_batch += 1
            self.batches[batch] = {"reloads": reloads, "offloads": offloads,
                                   "done": {True: not reloads, False: not offloads}}
            if reloads:
                self.unlaunched.add(batch)
        return (batch, _i32(h for h, _ in reloads), _i32(g for _, g in reloads), _i32(g for g, _ in offloads),
                _i32(h for _, h in offloads))

    def launched(self, batch) -> None:
        if not 1 <= batch < self.next_batch:
            raise InvalidArgumentError(f"launched(): transfer batch {batch} was never popped")
        self.unlaunched.discard(batch)

    def reloads_launched(self, batch) -> bool:
        return batch < self.next_batch and batch not in self.unlaunched

    def complete(self, batch, reloads: bool) -> None:
        entry = self.batches.get(batch)
        if entry is None or entry["done"][reloads]:
            raise InvalidArgumentError(f"complete(): batch {batch} has no {'reloads' if reloads else 'offloads'} "
                                       "in flight")
        pairs = entry["reloads"] if reloads else [(h, g) for g, h in entry["offloads"]]
        if not reloads:
            self.in_flight -= {h for h, _ in pairs}
        self.gpu.free(_i32(g for _, g in pairs))
        self.host.free(_i32(h for h, _ in pairs))
        self.counts["completed_reloads" if reloads else "completed_offloads"] += len(pairs)
        entry["done"][reloads] = True
        if reloads:
            self.unlaunched.discard(batch)
        if all(entry["done"].values()):
            del self.batches[batch]

    def readable(self, b: int) -> bool:
        return b not in self.in_flight

    def stats(self) -> dict:
        out = dict(self.counts, pending_reloads=len(self.reloads), pending_offloads=len(self.offloads))
        out["in_flight_reloads"] = sum(len(e["reloads"]) for e in self.batches.values() if not e["done"][True])
        out["in_flight_offloads"] = sum(len(e["offloads"]) for e in self.batches.values() if not e["done"][False])
        return out


class ReferenceTieredTables(ReferenceBlockTables):
    """`ReferenceBlockTables` (one full-attention group, prefix caching on) with the host tier's twin."""

    def __init__(self, allocator, block_size, host_allocator, **kwargs):
        super().__init__(allocator, block_size, **kwargs)
        if not self.layout.single_full or not self.enable_prefix_caching:
            raise InvalidArgumentError("host tier: one full-attention group with prefix caching only")
        self.tier = ReferenceHostTier(allocator, host_allocator)
        self._cursors: dict = {}
        self._reload_batch: dict = {}  # sequence -> the tier batch of its reloads

    def add(self, seq_id, prompt_tokens, extra=None) -> int:
        hit = super().add(seq_id, prompt_tokens, extra)
        seq = self._get(seq_id)
        sid = norm_id(seq_id)
        self._cursors[sid] = HostCursor()
        n, bs = seq.num_tokens, self.block_size
        if seq.tokens is None or n < bs:
            return hit
        matchable = (n - 1) // bs
        before = len(self.tier.reloads)
        hits, self._cursors[sid] = self.tier.continue_hit(self._allocator_hashes(seq.hashes[:matchable], 0),
                                                         seq.tokens, seq.context, hit // bs, seq.blocks)
        if len(self.tier.reloads) > before:
            self._reload_batch[sid] = self.tier.next_batch
        seq.num_computed = hits * bs
        return hits * bs

    def mark_computed(self, seqs, num_computed=None) -> None:
        if isinstance(seqs, BatchTables):
            ids = batch_ids(seqs.seq_ids)[1]
        else:
            ids = batch_ids(seqs)[1] if isinstance(seqs, (list, tuple, np.ndarray)) else [norm_id(seqs)]
        before = {s: self._seqs[s].num_cached for s in ids if s in self._seqs}
        super().mark_computed(seqs, num_computed)
        for sid in ids:  # C++ offloads inside offer_to_cache: only for sequences that offered blocks
            seq = self._seqs[sid]
            if seq.num_cached > before[sid]:
                cursor = self._cursors[sid]
                if cursor.chain != CHAIN_BROKEN and cursor.cached < seq.num_cached:
                    self.tier.offload(self._allocator_hashes(seq.hashes[:seq.num_cached], 0), seq.tokens,
                                      seq.context, seq.blocks, seq.num_cached, cursor)

    def _lookup_batch(self, seq_ids, what: str) -> tuple:
        given, ids, seqs = super()._lookup_batch(seq_ids, what)
        if what == "batch":
            for sid in ids:
                if sid in self._reload_batch and not self.tier.reloads_launched(self._reload_batch[sid]):
                    raise InvalidArgumentError(f"batch(): seq_id {sid!r} has blocks being reloaded from the host "
                                               "tier; pop_transfers() and run them first")
        return given, ids, seqs

    def fork(self, parent, child) -> None:
        super().fork(parent, child)
        self._cursors[norm_id(child)] = self._cursors[norm_id(parent)].copy()
        if norm_id(parent) in self._reload_batch:
            self._reload_batch[norm_id(child)] = self._reload_batch[norm_id(parent)]

    def free(self, seq_id) -> None:
        super().free(seq_id)
        sid = norm_id(seq_id)
        del self._cursors[sid]
        self._reload_batch.pop(sid, None)

    def pop_transfers(self) -> tuple:
        return self.tier.pop()
