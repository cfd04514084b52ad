"""Prefix caching across KV-cache groups in `ReferenceBlockTables`: the hit rule, the offers, the window release.

The hit (vLLM's rule): the longest h (in blocks, ``h <= (prompt_len - 1) // block_size``) such that
every full group holds blocks ``0 .. h-1`` verified along its chain, and every windowed group holds
verified the blocks covering tokens ``[max(0, h * bs - W + 1), h * bs)``; its positions before those
are never taken (`RELEASED`). A windowed group's entry for block j is anchored on the reference chain,
the first full group's chain value after block j - 1, so it needs only block j itself cached; with no
full group at all every group chains on its own blocks (its hits then need every earlier block cached).

The search probes without taking anything, then takes every hit and every fresh block in one
all-or-nothing allocator call:

1. each chained group walks its chain, up to the smallest h found so far;
2. the anchored groups are checked from h down: a miss at block i of any group rules out every h' in
   (i, h] (block i lies in their windows), so h becomes i and the check starts again from the first
   anchored group (blocks verified already are not probed again).
"""
from __future__ import annotations

import numpy as np

from ._reference import CHAIN_ROOT
from ._reference_groups import group_context
from ._reference_seq import RELEASED, ReferenceSeq
from .errors import OutOfBlocksError


class _Search:
    """A hit across groups in the making: per group, the probed blocks and stamps at each position."""

    def __init__(self, tables, tokens: np.ndarray, hashes: list, context: int, matchable: int):
        self.tables, self.bs, self.h, self.collisions = tables, tables.block_size, matchable, 0
        self.tokens = tokens[:matchable * tables.block_size]
        groups = range(tables.num_groups)
        self.hashes = [np.array(tables._allocator_hashes(hashes[:matchable], g), dtype=np.uint64) for g in groups]
        self.contexts = [group_context(context, g, tables.allocator.hash_key) for g in groups]
        self.ids = [[RELEASED] * matchable for _ in groups]
        self.stamps = [[CHAIN_ROOT] * matchable for _ in groups]

    def chained(self) -> None:
        for g in self.tables.layout.chained():
            if self.h == 0:
                return
            ids, stamps, collided = self.tables.allocator.probe_chain(
                self.hashes[g][:self.h], self.tokens[:self.h * self.bs], self.contexts[g])
            self.h = len(ids)
            self.ids[g][:self.h], self.stamps[g][:self.h] = ids.tolist(), stamps.tolist()
            self.collisions += collided

    def windows(self) -> None:
        layout, bs = self.tables.layout, self.bs
        anchored = layout.anchors()
        anchors = self.stamps[layout.reference] if anchored else []  # the reference chain, valid below h
        verified = [self.h] * len(anchored)  # group anchored[a] has [verified[a], h) verified so far
        a = 0
        while a < len(anchored) and self.h > 0:
            g = anchored[a]
            lo = layout.released(g, self.h * bs, bs)
            verified[a] = min(verified[a], self.h)
            if lo >= verified[a]:
                a += 1
                continue
            top = verified[a]
            parents = [CHAIN_ROOT if j == 0 else anchors[j - 1] for j in range(lo, top)]
            ids, stamps, collided = self.tables.allocator.probe_anchored(
                self.hashes[g][lo:top], self.tokens[lo * bs:top * bs], self.contexts[g], parents)
            verified[a] = top - len(ids)
            self.ids[g][verified[a]:top], self.stamps[g][verified[a]:top] = ids.tolist(), stamps.tolist()
            if verified[a] > lo:  # a miss at verified[a] - 1: no hit above it; check every group again
                self.collisions += collided
                self.h, a = verified[a] - 1, 0
            else:
                a += 1


def allocate_prompt(tables, seq_id, tokens: np.ndarray, hashes: list, total: int, extra, context: int) -> ReferenceSeq:
    """A new sequence's blocks in every group, prefix hits first: one all-or-nothing allocator call."""
    bs, layout = tables.block_size, tables.layout
    groups = layout.num_groups
    matchable = (len(tokens) - 1) // bs  # the last token is recomputed for its logits
    search = _Search(tables, tokens, hashes, context, matchable)
    search.chained()
    search.windows()
    h = search.h
    lo = [layout.released(g, h * bs, bs) for g in range(groups)]
    taken = [(search.ids[g][j], search.stamps[g][j]) for j in range(h) for g in range(groups) if j >= lo[g]]
    try:
        fresh = tables.allocator.take_cached([b for b, _ in taken], [s for _, s in taken], groups * (total - h),
                                             groups * matchable, search.collisions)
    except OutOfBlocksError as err:
        raise OutOfBlocksError(
            f"add({seq_id!r}) of a {len(tokens)}-token prompt needs {err.requested} new blocks but {err.available} "
            "are free; free or preempt sequences, or size the pool larger", requested=err.requested,
            available=err.available) from err
    assert fresh is not None, "a probed block was evicted before it was taken (one thread: impossible)"
    fresh = fresh.tolist()
    blocks = [[RELEASED] * lo[g] + search.ids[g][lo[g]:h] + fresh[g::groups] for g in range(groups)]
    chains = [search.stamps[g][h - 1] if h and not layout.anchored(g) else CHAIN_ROOT for g in range(groups)]
    return ReferenceSeq(blocks, len(tokens), h * bs, tokens.tolist(), hashes, h, extra, context, chains)


def offer_to_cache(tables, seq: ReferenceSeq) -> None:
    """Offer every group's computed full hashed blocks not offered yet: chained groups first, then anchored.

    The reference group records the chain value after each block: the parents of the anchored
    groups' entries.
    """
    bs, layout, alloc = tables.block_size, tables.layout, tables.allocator
    first, full = seq.num_cached, min(seq.num_computed // bs, len(seq.hashes))
    if not tables.enable_prefix_caching or full <= first:
        return
    tokens = np.array(seq.tokens[first * bs:full * bs], dtype=np.int32)
    anchored = layout.anchors()
    anchors = []  # the reference chain after blocks first - 1 .. full - 1
    for g in layout.chained():
        args = (np.array(seq.tables[g][first:full], dtype=np.int32),
                np.array(tables._allocator_hashes(seq.hashes[first:full], g), dtype=np.uint64), tokens,
                group_context(seq.context, g, alloc.hash_key), seq.chains[g])
        assert RELEASED not in seq.tables[g][first:full], "a block was given back before it was offered"
        if g == layout.reference and anchored:
            anchors = [seq.chains[g]] + alloc.cache_blocks_chained(*args).tolist()
            seq.chains[g] = anchors[-1]
        else:
            seq.chains[g] = alloc.cache_blocks_verified(*args)
    for g in anchored:
        assert RELEASED not in seq.tables[g][first:full], "a block was given back before it was offered"
        parents = [CHAIN_ROOT if j == 0 else anchors[j - first] for j in range(first, full)]
        alloc.cache_blocks_anchored(np.array(seq.tables[g][first:full], dtype=np.int32),
                                    np.array(tables._allocator_hashes(seq.hashes[first:full], g), dtype=np.uint64),
                                    tokens, group_context(seq.context, g, alloc.hash_key), parents)
    seq.num_cached = full


def release_window(tables, seq: ReferenceSeq) -> list:
    """The blocks the windowed groups give back now (-1 left in their place), newest position first.

    Within a position the groups come in order; the caller frees them in one call, which queues the
    oldest position first, so it is evicted first.
    """
    bs, layout = tables.block_size, tables.layout
    gone = []
    if all(w is None for w in layout.windows):
        return gone
    for j in range(len(seq.blocks) - 1, -1, -1):
        for g in range(layout.num_groups):
            if j < layout.released(g, seq.num_computed, bs) and seq.tables[g][j] != RELEASED:
                gone.append(seq.tables[g][j])
                seq.tables[g][j] = RELEASED
    return gone
