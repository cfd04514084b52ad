"""How `ReferenceBlockTables.append_batch` grows sequences: every decision planned first, applied last.

Planning reads state only: it validates ``token_ids``, checks ``max_blocks_per_seq``, decides each
copy-on-write as the sequential appends would (an earlier sequence's copy hands its reference on the
shared tail to the copy queue, so a later twin may then write that block in place) and hashes the
blocks the new known tokens fill. The tables then allocate every new block in one call and apply the
plans in sequence order, so the block ids are those of ``for s in seq_ids: append(s, n)``. Within one
sequence the copies come first (group by group), then the new positions, each with one block per group.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidArgumentError

MAX_TOKEN_ID = (1 << 31) - 1


class Growth:
    """The planned growth of one sequence by ``num_tokens`` tokens.

    Attributes
    ----------
    seq : ReferenceSeq
    old_tokens : int
        Tokens before the append (the first new token's position).
    num_tokens : int
        Tokens appended.
    copy_tail : list of bool
        Per group: the shared partial last block is copied first (the group's first new block is its copy).
    grow : int
        New positions per group (the same in every group).
    num_new_blocks : int
        Blocks this sequence takes from the batch's allocation: its copies, then ``grow`` positions x groups.
    first_new : int
        Index of its first block in the batch's allocation.
    tokens : list of int or None
        The appended tokens, when the sequence still knows all its tokens; else None.
    hashes : list of int
        Hashes of the blocks those tokens fill, chained after the sequence's last hash.
    """

    __slots__ = ("seq", "old_tokens", "num_tokens", "copy_tail", "grow", "num_new_blocks", "first_new", "tokens",
                 "hashes")

    def __init__(self, seq, num_tokens: int, copy_tail: list, grow: int, first_new: int, tokens, hashes):
        self.seq = seq
        self.old_tokens = seq.num_tokens
        self.num_tokens = num_tokens
        self.copy_tail = copy_tail
        self.grow = grow
        self.num_new_blocks = len(copy_tail) * grow + sum(copy_tail)
        self.first_new = first_new
        self.tokens = tokens
        self.hashes = hashes

    def copy_destinations(self, new_blocks: list) -> list:
        """The copies among this sequence's `new_blocks` (the copy queue takes a reference on each)."""
        return new_blocks[:sum(self.copy_tail)]

    def apply(self, tables, new_blocks: list) -> None:
        """Change the sequence (and the copy queue of `tables`) as planned, with its `new_blocks`."""
        seq, copies = self.seq, iter(new_blocks[:sum(self.copy_tail)])
        for blocks, copy in zip(seq.tables, self.copy_tail):
            if copy:
                dst = next(copies)
                tables._queue_copy(blocks[-1], dst)
                blocks[-1] = dst
        positions = new_blocks[sum(self.copy_tail):]  # position-major: a position's groups together
        groups = len(seq.tables)
        for g, blocks in enumerate(seq.tables):
            blocks.extend(positions[g::groups])
        seq.shared_tail = False  # the tail is now private: copied, no longer shared, or a fresh block
        seq.num_tokens += self.num_tokens
        if self.tokens is not None:
            seq.tokens.extend(self.tokens)
            seq.hashes.extend(self.hashes)
        # else: without ids the known tokens stop here for good (len(seq.tokens) < seq.num_tokens from now on)


def token_rows(token_ids, b: int, n: int):
    """``b`` lists of ``n`` validated token ids (seq-major), or None when `token_ids` is None."""
    if token_ids is None:
        return None
    arr = np.asarray(token_ids)
    if arr.shape not in ((b * n,), (b, n)):
        raise InvalidArgumentError(f"token_ids of shape {arr.shape} must be [{b * n}] or [{b}, {n}]: n_tokens={n} "
                                   f"ids for each of the {b} sequences, seq-major")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"token_ids must be integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise InvalidArgumentError(f"token_ids hold ids outside [0, 2**31): {arr.min()}..{arr.max()}")
    return arr.reshape(b, n).astype(np.int64).tolist()


def _copies_tail(tables, seq, blocks: list, queued: dict) -> bool:
    """Whether appending to `seq` copies the last of `blocks` (one group's); `queued` counts the queue's references."""
    if seq.num_tokens % tables.block_size == 0 or not seq.shared_tail:
        return False
    last = blocks[-1]
    holders = int(tables.allocator.refcounts([last])[0]) - queued.get(last, 0)  # holders other than the queue
    if holders <= 1:
        return False  # every twin already copied away: written in place
    queued[last] = queued.get(last, 0) + 1  # this sequence's reference passes to the queue
    return True


def plan_growth(tables, ids: list, seqs: list, n: int, token_ids) -> list:
    """One `Growth` per sequence, in order; raises (nothing changed) on a bad token or too long a sequence.

    Parameters
    ----------
    tables : ReferenceBlockTables
    ids, seqs : list
        The sequence ids (for messages) and their records, distinct.
    n : int
        Tokens appended to each, >= 1.
    token_ids : array-like of int or None
        ``[b * n]`` or ``[b, n]`` the appended tokens.
    """
    rows = token_rows(token_ids, len(ids), n)
    bs = tables.block_size
    queued = dict(tables._queued)
    plans, first_new = [], 0
    for i, (seq_id, seq) in enumerate(zip(ids, seqs)):
        total = -(-(seq.num_tokens + n) // bs)
        tables._check_width(seq_id, total, f"appending {n} tokens")
        copy_tail = [_copies_tail(tables, seq, blocks, queued) for blocks in seq.tables]
        tokens, hashes = None, []
        if rows is not None and seq.knows_all_tokens:
            tokens = rows[i]
            pending = seq.unhashed_tokens(bs) + tokens
            full = len(pending) // bs * bs
            if full:
                parent = seq.hashes[-1] if seq.hashes else None
                hashes = tables._hash_continued(pending[:full], seq.extra, parent)
        plans.append(Growth(seq, n, copy_tail, total - len(seq.blocks), first_new, tokens, hashes))
        first_new += plans[-1].num_new_blocks
    return plans
