"""Prefix caching across KV-cache groups in `ReferenceBlockTables`: the hit rule, the offers, the window release.

The hit (vLLM's rule): the longest h (in blocks, ``h <= (prompt_len - 1) // block_size``) such that
every full group holds blocks ``0 .. h-1`` verified along its chain, and every windowed group holds
verified the blocks covering tokens ``[max(0, h * bs - W + 1), h * bs)``; its positions before those
are never taken (`RELEASED`). A windowed group's entry for block j is anchored on the reference chain,
the first full group's chain value after block j - 1, so it needs only block j itself cached; with no
full group at all every group walks its own chain (its hits then need every earlier block cached).
"""
from __future__ import annotations

import numpy as np

from ._reference import CHAIN_ROOT
from ._reference_groups import group_context
from ._reference_seq import RELEASED, ReferenceSeq
from .errors import OutOfBlocksError


class _Probe:
    """Memoised single-block lookups of one anchored windowed group (each block looked up at most once)."""

    def __init__(self, tables, hashes: list, blocks: list, context: int, ref_stamps: list):
        self.tables, self.hashes, self.blocks, self.context = tables, hashes, blocks, context
        self.ref_stamps = ref_stamps  # the reference chain value after each block
        self.found: dict[int, int] = {}
        self.collisions = 0

    def __call__(self, j: int) -> int:
        if j not in self.found:
            parent = CHAIN_ROOT if j == 0 else self.ref_stamps[j - 1]
            ids, _, collided = self.tables.allocator.find_verified(
                self.hashes[j:j + 1], self.blocks[j], self.context, np.array([parent], dtype=np.uint64))
            self.found[j], self.collisions = int(ids[0]), self.collisions + collided
        return self.found[j]


def _longest_hit(tables, h: int, probes: dict) -> int:
    """The largest hit <= h whose every windowed range is verified (a miss at j caps the hit at j)."""
    bs, layout = tables.block_size, tables.layout
    capped = True
    while capped:
        capped = False
        for g, probe in probes.items():
            lo = layout.released(g, h * bs, bs)
            miss = next((j for j in range(h - 1, lo - 1, -1) if probe(j) == RELEASED), None)
            if miss is not None:
                h, capped = miss, True
    return h


def allocate_prompt(tables, seq_id, tokens: np.ndarray, hashes: list, total: int, extra, context: int) -> ReferenceSeq:
    """A new sequence's blocks in every group, prefix hits first: one all-or-nothing allocator call."""
    bs, layout, alloc = tables.block_size, tables.layout, tables.allocator
    n, groups = len(tokens), range(layout.num_groups)
    matchable = (n - 1) // bs  # the last token is recomputed for its logits
    contexts = [group_context(context, g) for g in groups]
    group_hashes = [np.array(tables._allocator_hashes(hashes[:matchable], g), dtype=np.uint64) for g in groups]
    blocks = [tokens[j * bs:(j + 1) * bs] for j in range(matchable)]
    walks = {g: alloc.walk_verified(group_hashes[g], tokens[:matchable * bs], contexts[g]) for g in layout.walked()}
    h = min([matchable] + [len(ids) for ids, _, _ in walks.values()])
    ref = layout.reference
    probes = {g: _Probe(tables, group_hashes[g], blocks, contexts[g], walks[ref][1].tolist())
              for g in groups if layout.anchored(g)}
    h = _longest_hit(tables, h, probes)
    hits, chains = [], []
    for g in groups:
        lo = layout.released(g, h * bs, bs)
        if g in walks:
            ids, stamps, _ = walks[g]
            hits.append(ids[lo:h].tolist())
            chains.append(int(stamps[h - 1]) if h else CHAIN_ROOT)
        else:
            hits.append([probes[g](j) for j in range(lo, h)])
            chains.append(CHAIN_ROOT)  # unused: its entries hang on the reference chain
    collisions = sum(int(c) for _, _, c in walks.values()) + sum(p.collisions for p in probes.values())
    taken = [b for group_hits in hits for b in group_hits]
    try:
        fresh = alloc.allocate_with_hits(layout.num_groups * (total - h), taken, matchable * layout.num_groups,
                                         collisions).tolist()
    except OutOfBlocksError as err:
        raise OutOfBlocksError(
            f"add({seq_id!r}) of a {n}-token prompt needs {err.requested} new blocks but {err.available} are "
            "free; free or preempt sequences, or size the pool larger", requested=err.requested,
            available=err.available) from err
    per = total - h
    tables_ = [[RELEASED] * (h - len(hits[g])) + hits[g] + fresh[g * per:(g + 1) * per] for g in groups]
    return ReferenceSeq(tables_, n, h * bs, tokens.tolist(), hashes, h, extra, context, chains)


def offer_to_cache(tables, seq: ReferenceSeq) -> None:
    """Offer every group's computed full hashed blocks not offered yet; the reference group goes first."""
    bs, layout, alloc = tables.block_size, tables.layout, tables.allocator
    first, full = seq.num_cached, min(seq.num_computed // bs, len(seq.hashes))
    if not tables.enable_prefix_caching or full <= first:
        return
    ref = layout.reference
    order = ([ref] if ref is not None else []) + [g for g in range(layout.num_groups) if g != ref]
    ref_stamps = {first - 1: seq.chains[ref]} if ref is not None else {}  # reference chain after block j
    for g in order:
        hashes = tables._allocator_hashes(seq.hashes[first:full], g)
        context, blocks = group_context(seq.context, g), seq.tables[g]
        if layout.anchored(g):
            for j in range(first, full):  # each block on its own, after the reference chain's block j - 1
                if blocks[j] != RELEASED:
                    parent = CHAIN_ROOT if j == 0 else ref_stamps[j - 1]
                    alloc.cache_blocks_verified(np.array([blocks[j]], dtype=np.int32), hashes[j - first:j - first + 1],
                                                seq.tokens[j * bs:(j + 1) * bs], context, parent)
            continue
        assert RELEASED not in blocks[first:full], "a block was given back before it was offered"
        if g == ref and len(layout.walked()) < layout.num_groups:  # block by block: windowed groups anchor on each
            for j in range(first, full):
                ref_stamps[j] = alloc.cache_blocks_verified(
                    np.array([blocks[j]], dtype=np.int32), hashes[j - first:j - first + 1],
                    seq.tokens[j * bs:(j + 1) * bs], context, ref_stamps[j - 1])
            seq.chains[g] = ref_stamps[full - 1]
        else:
            seq.chains[g] = alloc.cache_blocks_verified(
                np.array(blocks[first:full], dtype=np.int32), np.array(hashes, dtype=np.uint64),
                np.array(seq.tokens[first * bs:full * bs], dtype=np.int32), context, seq.chains[g])
    seq.num_cached = full


def release_window(tables, seq: ReferenceSeq) -> None:
    """Give back every windowed group's blocks that left its window: one free call per group, in token order."""
    bs, layout = tables.block_size, tables.layout
    for g in range(layout.num_groups):
        blocks = seq.tables[g]
        gone = [j for j in range(layout.released(g, seq.num_computed, bs)) if blocks[j] != RELEASED]
        if gone:
            tables.allocator.free(np.array([blocks[j] for j in gone], dtype=np.int32))
            for j in gone:
                blocks[j] = RELEASED
