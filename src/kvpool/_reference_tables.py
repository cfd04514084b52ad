"""`ReferenceBlockTables`: the pure-Python twin and oracle of `kvpool.block_table.BlockTables`.

Same contract (docs/page_table.md; issues 10 and 13), written for clarity: per-sequence Python lists
(`ReferenceSeq`, one block list per KV-cache group), appends planned before they are applied
(`_reference_append`), batch tensors built row by row (`_reference_batch`), the window rule and prefix
hits across groups apart (`_reference_groups`, `_reference_prefix`). Every method validates and computes
first and changes state last, so an error leaves every sequence and the allocator unchanged. Works with
either allocator (``kvpool.BlockAllocator`` or ``kvpool._reference.ReferenceBlockAllocator``); prefix
hits across several groups need the latter's read-only lookups.

Sequence ids are any hashables; numpy integers are the equal Python ints (``np.int64(5)`` is ``5``),
and the batch calls also take a 1-D numpy array of ids.
"""
from __future__ import annotations

import numpy as np

from . import _reference
from . import allocator as _allocator
from ._arrays import as_int, as_prompt, check_geometry
from ._device_check import checked_device
from ._reference_append import plan_growth
from ._reference_batch import BatchTensorsMixin
from ._reference_groups import GroupLayout, check_group_windows, group_hash
from ._reference_ids import batch_ids, no_repeats, norm_id
from ._reference_prefix import allocate_prompt, offer_to_cache, release_window
from ._reference_seq import ReferenceSeq
from ._reference_sharing import SharingMixin
from .batch_tables import BatchTables
from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError


class ReferenceBlockTables(BatchTensorsMixin, SharingMixin):
    """Block lists of the live sequences of one TP group and the batch tensors built from them.

    Parameters
    ----------
    allocator : BlockAllocator or ReferenceBlockAllocator
        Hands out block ids; one per TP group.
    block_size : int
        Tokens per block; must equal ``allocator.block_size``.
    device : str or torch.device
        Where the batch tensors go (the cache's device).
    max_seqs : int
        Most sequences in one batch.
    enable_prefix_caching : bool, optional
        Hash full blocks and reuse cached ones; defaults to the allocator's setting.
    max_blocks_per_seq : int, optional
        Most blocks one sequence may hold (the width of `decode_step`'s table); defaults to
        ``allocator.num_blocks``.
    group_windows : sequence of (int or None), optional
        One entry per KV-cache group: None (full attention) or its window in tokens (>= 1); default
        ``(None,)``, one full group. With several groups, or a windowed one, and prefix caching, the
        allocator must probe across groups (``probe_chain``, ``probe_anchored``, ``take_cached``).
    _hash_bits : int
        Tests only: keep this many low bits of every hash handed to the allocator (collisions on demand).
    """

    def __init__(self, allocator, block_size: int, device="cpu", max_seqs: int = 256,
                 enable_prefix_caching: bool | None = None, max_blocks_per_seq: int | None = None,
                 group_windows=None, _hash_bits: int = 64):
        if int(block_size) != int(allocator.block_size):
            raise InvalidArgumentError(
                f"block_size={block_size} differs from the allocator's block_size={allocator.block_size}; "
                "pass the allocator's block size")
        check_geometry(allocator.num_blocks, block_size, "BlockTables")  # slot ids must fit in int32
        if int(max_seqs) < 1:
            raise InvalidArgumentError(f"max_seqs={max_seqs} must be >= 1 (the largest batch you will build)")
        width = allocator.num_blocks if max_blocks_per_seq is None else as_int(max_blocks_per_seq,
                                                                               "max_blocks_per_seq")
        if width < 1:
            raise InvalidArgumentError(f"max_blocks_per_seq={width} must be >= 1; pass "
                                       "ceil(max_model_len / block_size)")
        self.allocator = allocator
        self.block_size = int(block_size)
        self.device = checked_device(device)  # an absent CUDA device: one clear line
        self.max_seqs = int(max_seqs)
        self.max_blocks_per_seq = int(width)
        if enable_prefix_caching is None:
            enable_prefix_caching = bool(getattr(allocator, "enable_prefix_caching", True))
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.layout = GroupLayout(check_group_windows(group_windows))
        if self.enable_prefix_caching and not self.layout.single_full and not hasattr(allocator, "probe_chain"):
            raise InvalidArgumentError(
                f"group_windows={self.layout.windows} with prefix caching needs an allocator that probes across "
                f"groups (probe_chain / probe_anchored / take_cached); {type(allocator).__name__} has none: use "
                "kvpool.BlockAllocator or kvpool._reference.ReferenceBlockAllocator, or enable_prefix_caching=False")
        bits = as_int(_hash_bits, "_hash_bits")
        if not 0 <= bits <= 64:
            raise InvalidArgumentError(f"_hash_bits={_hash_bits} must lie in [0, 64]")
        self._mask = (1 << bits) - 1
        reference = isinstance(allocator, _reference.ReferenceBlockAllocator)
        self._hash_fn = _reference.hash_block_tokens if reference else _allocator.hash_block_tokens
        self._seqs: dict = {}
        self._copies: list[tuple[int, int]] = []  # queued copy-on-write (src, dst) pairs
        self._queued: dict[int, int] = {}  # block id -> references the copy queue holds on it

    # ----------------------------------------------------------------- introspection
    def __contains__(self, seq_id) -> bool:
        return norm_id(seq_id) in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def _get(self, seq_id) -> ReferenceSeq:
        seq = self._seqs.get(norm_id(seq_id))
        if seq is None:
            raise BlockIndexError(f"unknown seq_id {seq_id!r}: add() it first (or it was already freed)")
        return seq

    @property
    def num_groups(self) -> int:
        """KV-cache groups (1 for a single-attention-kind model)."""
        return self.layout.num_groups

    @property
    def group_windows(self) -> tuple:
        """Each group's window in tokens (None: full attention)."""
        return self.layout.windows

    def blocks(self, seq_id, group: int = 0) -> np.ndarray:
        """``[n_blocks] int32`` copy of group `group`'s block ids of `seq_id`, in token order.

        ``n_blocks = ceil(num_tokens / block_size)`` in every group; a windowed group has -1 at the
        positions it gave back (or never took: they lay wholly before the window).
        """
        seq = self._get(seq_id)
        if isinstance(group, (bool, np.bool_)) or not isinstance(group, (int, np.integer)) or \
                not 0 <= group < self.num_groups:
            raise InvalidArgumentError(f"blocks({seq_id!r}, group={group!r}): group must be an int in "
                                       f"[0, {self.num_groups}) (the tables have {self.num_groups} KV-cache groups)")
        return np.array(seq.tables[int(group)], dtype=np.int32)

    def num_tokens(self, seq_id) -> int:
        """Tokens in `seq_id` (prompt plus appended)."""
        return self._get(seq_id).num_tokens

    def num_computed(self, seq_id) -> int:
        """Leading tokens of `seq_id` whose KV is written (prefix hits plus `mark_computed`)."""
        return self._get(seq_id).num_computed

    def _check_width(self, seq_id, num_blocks: int, what: str) -> None:
        # With W >= the pool and a full-attention group (a block at every position), more than W blocks can
        # never be free: the allocator's OutOfBlocksError says so. Windowed groups alone release what leaves
        # their window, so positions may outgrow the pool and the width always binds.
        pool_bounds = None in self.group_windows and self.max_blocks_per_seq >= self.allocator.num_blocks
        if num_blocks > self.max_blocks_per_seq and not pool_bounds:
            raise InvalidArgumentError(
                f"{what} would give seq_id {seq_id!r} {num_blocks} blocks, more than max_blocks_per_seq="
                f"{self.max_blocks_per_seq}; pass max_blocks_per_seq=ceil(max_model_len / block_size) when "
                "building the tables, or stop the sequence sooner")

    # ----------------------------------------------------------------- hashing
    def _hash(self, tokens: np.ndarray, extra) -> np.ndarray:
        """``[n // block_size] uint64`` prompt block hashes under the allocator's key (tests weaken them here)."""
        return self.allocator.hash_tokens(tokens, extra)

    def _allocator_hashes(self, hashes: list, group: int) -> list:
        """Group `group`'s hashes of blocks whose group-0 hashes are `hashes`, as the allocator sees them."""
        return [group_hash(h, group, self.allocator.hash_key) & self._mask for h in hashes]

    def _hash_continued(self, tokens: list, extra, parent_hash) -> list:
        """Hashes of the full blocks of `tokens`, chained after `parent_hash` (None: the first block)."""
        return self._hash_fn(np.asarray(tokens, dtype=np.int32), self.block_size, parent_hash=parent_hash,
                             extra=extra, key=self.allocator.hash_key).tolist()

    # ----------------------------------------------------------------- sequence operations
    def add(self, seq_id, prompt_tokens, extra=None) -> int:
        """Allocate blocks for a new sequence's prompt.

        Parameters
        ----------
        seq_id : hashable
            New sequence id (an error if already present).
        prompt_tokens : array-like of int or int
            ``[prompt_len]`` token ids, or just a token count (no prefix caching then).
        extra : bytes, str or int, optional
            Salt mixed into the block hashes (per-tenant / per-LoRA cache salt).

        Returns
        -------
        int
            Prompt tokens found in the prefix cache (a multiple of `block_size`, never the whole prompt:
            the last token is always recomputed). Every hit is verified token by token.

        Raises
        ------
        OutOfBlocksError
            Too few free blocks; nothing changed.
        """
        seq_id = norm_id(seq_id)
        if seq_id in self._seqs:
            raise InvalidArgumentError(f"seq_id {seq_id!r} already exists: free() it or use a new id")
        tokens, n = as_prompt(seq_id, prompt_tokens)
        bs, groups = self.block_size, self.num_groups
        total = -(-n // bs)
        self._check_width(seq_id, total, f"add() of a {n}-token prompt")
        what = f"add({seq_id!r}) of a {n}-token prompt"
        chains = [_reference.CHAIN_ROOT] * groups
        if not self.enable_prefix_caching or tokens is None:  # nothing is hashed, nothing kept
            self._seqs[seq_id] = ReferenceSeq(self._allocate_groups(total, what), n, chains=chains)
            return 0
        context = self.allocator.extra_key(extra)
        if n < bs:  # no full block to match: a plain allocation; the tokens are kept for later blocks
            self._seqs[seq_id] = ReferenceSeq(self._allocate_groups(total, what), n, tokens=tokens.tolist(),
                                              extra=extra, context=context, chains=chains)
            return 0
        hashes = np.asarray(self._hash(tokens, extra), dtype=np.uint64)
        if not self.layout.single_full:  # hits across groups: every group must serve them
            seq = allocate_prompt(self, seq_id, tokens, hashes.tolist(), total, extra, context)
            self._seqs[seq_id] = seq
            return seq.num_computed
        matchable = (n - 1) // bs  # only blocks entirely before the last token: it is recomputed for its logits
        try:  # one all-or-nothing call: every hit's tokens compared, then the fresh blocks
            blocks, hits, chain = self.allocator.allocate_with_prefix(
                total, np.array(self._allocator_hashes(hashes[:matchable].tolist(), 0), dtype=np.uint64),
                tokens[:matchable * bs], context)
        except OutOfBlocksError as err:
            raise OutOfBlocksError(
                f"add({seq_id!r}) of a {n}-token prompt needs {err.requested} new blocks but {err.available} are "
                "free; free or preempt sequences, or size the pool larger", requested=err.requested,
                available=err.available) from err
        self._seqs[seq_id] = ReferenceSeq([blocks.tolist()], n, hits * bs, tokens.tolist(), hashes.tolist(), hits,
                                          extra, context, [chain])
        return hits * bs

    def _allocate_groups(self, n: int, what: str) -> list:
        """`n` fresh positions in every group, in one call, position-major: a position's groups together."""
        fresh = self._allocate(n * self.num_groups, what)
        return [fresh[g::self.num_groups] for g in range(self.num_groups)]

    def _allocate(self, n: int, what: str) -> list:
        if n <= 0:
            return []
        try:
            return np.asarray(self.allocator.allocate(n), dtype=np.int32).tolist()
        except OutOfBlocksError as err:
            raise OutOfBlocksError(
                f"{what} needs {n} new blocks but {err.available} are free; free or preempt sequences, "
                "or size the pool larger", requested=n, available=err.available) from err

    def append(self, seq_id, n_tokens: int = 1, token_ids=None) -> np.ndarray:
        """Grow `seq_id` by `n_tokens` tokens (decoded or speculative), allocating blocks as they fill.

        If the last block is partial and shared (after `fork`), it is copied first: this sequence gets
        a fresh block and the pair ``(src, dst)`` is queued for `pop_copies`.

        Parameters
        ----------
        seq_id : hashable
        n_tokens : int
            Tokens to append, >= 1.
        token_ids : array-like of int, optional
            ``[n_tokens]`` the tokens appended, in [0, 2**31): the blocks they fill get hashes and join
            the prefix cache once computed. Without them the sequence's later blocks are never hashed.

        Returns
        -------
        np.ndarray
            ``[n_tokens] int32`` slots (``block_id * block_size + offset``) of the new tokens;
            ``[G, n_tokens]`` (one row per KV-cache group) with G > 1 groups.

        Raises
        ------
        OutOfBlocksError
            Too few free blocks; nothing changed.
        """
        self._get(seq_id)  # an unknown id is a BlockIndexError before anything else
        return self.append_batch([seq_id], n_tokens, token_ids)

    def append_batch(self, seq_ids, n_tokens: int = 1, token_ids=None) -> np.ndarray:
        """``for s in seq_ids: append(s, n_tokens)``, all or nothing.

        Parameters
        ----------
        seq_ids : sequence of hashable or np.ndarray
            Distinct live sequences (a 1-D integer array is the fast path); may be empty.
        n_tokens : int
            Tokens appended to each sequence, >= 1.
        token_ids : array-like of int, optional
            ``[b * n_tokens]`` or ``[b, n_tokens]`` int, seq-major: the tokens appended.

        Returns
        -------
        np.ndarray
            ``[b * n_tokens] int32`` slots of the new tokens, seq-major; ``[G, b * n_tokens]`` (group-major:
            one row per KV-cache group) with G > 1 groups.

        Raises
        ------
        BlockIndexError
            An unknown id.
        InvalidArgumentError
            A repeated id, a bad `n_tokens` or `token_ids`, a sequence grown past `max_blocks_per_seq`.
        OutOfBlocksError
            ``requested`` = every new block the batch needs (copies included), ``available`` = free
            blocks; nothing changed.
        """
        _, ids = batch_ids(seq_ids)
        seqs = [self._get(s) for s in ids]
        no_repeats(ids, "append_batch")
        n = as_int(n_tokens, f"append({ids[0]!r}): n_tokens" if len(ids) == 1 else "append_batch: n_tokens")
        if n < 1:
            raise InvalidArgumentError(f"append(n_tokens={n}) on seq_ids {tuple(ids)}: need n_tokens >= 1")
        plans = plan_growth(self, ids, seqs, n, token_ids)
        need = sum(p.num_new_blocks for p in plans)
        what = f"append({ids[0]!r}, {n})" if len(ids) == 1 else f"append_batch of {len(ids)} sequences x {n} tokens"
        fresh = self._allocate(need, what)  # ONE call: the same ids, in the same order, as sequential appends
        shares = [fresh[p.first_new:p.first_new + p.num_new_blocks] for p in plans]
        dsts = [b for p, share in zip(plans, shares) for b in p.copy_destinations(share)]
        if dsts:  # the copy queue's reference on each destination
            self.allocator.incref(dsts)
        for p, share in zip(plans, shares):
            p.apply(self, share)
        slots = np.array([[s for p in plans for s in self._slots(p.seq.tables[g], p.old_tokens, n)]
                          for g in range(self.num_groups)], dtype=np.int32).reshape(self.num_groups, -1)
        return slots[0] if self.num_groups == 1 else slots

    def _slots(self, blocks: list, start: int, n: int) -> list:
        """Slots of tokens ``start .. start + n`` in one group's `blocks` (new tokens: never a released position)."""
        bs = self.block_size
        return [blocks[pos // bs] * bs + pos % bs for pos in range(start, start + n)]

    def mark_computed(self, seqs, num_computed=None) -> None:
        """Record that KV has been written; offer newly computed full hashed blocks to the prefix cache.

        Then every windowed group gives back the blocks that left its window (still cached, if they were),
        in one allocator call for all the sequences.

        Parameters
        ----------
        seqs : BatchTables, hashable, sequence of hashable or np.ndarray
            A batch (its ``seq_lens_host`` of the first ``len(seq_ids)`` rows are the new computed
            lengths; padding rows are ignored), one sequence id, or several (no repeats).
        num_computed : int or sequence of int, optional
            Leading tokens now written, per sequence; defaults to all tokens of each sequence.
        """
        if isinstance(seqs, BatchTables):
            _, ids = batch_ids(seqs.seq_ids)
            lens = seqs.seq_lens_host[:len(ids)].tolist()
        else:
            ids = batch_ids(seqs)[1] if isinstance(seqs, (list, tuple, np.ndarray)) else [norm_id(seqs)]
            lens = [None] * len(ids) if num_computed is None else \
                [as_int(x, "mark_computed: num_computed") for x in np.atleast_1d(num_computed).tolist()]
            if len(lens) != len(ids):
                raise InvalidArgumentError(
                    f"mark_computed got {len(ids)} sequences but {len(lens)} lengths; pass one per sequence")
        found = [self._get(s) for s in ids]
        no_repeats(ids, "mark_computed")
        for seq_id, seq, n in zip(ids, found, lens):  # validate everything before changing anything
            if n is not None and not seq.num_computed <= n <= seq.num_tokens:
                raise InvalidArgumentError(
                    f"mark_computed({seq_id!r}, {n}): must lie in [{seq.num_computed}, {seq.num_tokens}] "
                    "(computed so far, tokens in the sequence)")
        released = []
        for seq, n in zip(found, lens):
            seq.num_computed = seq.num_tokens if n is None else n
            offer_to_cache(self, seq)  # before the release: a released block stays cached (free, evictable)
            released += release_window(self, seq)
        if released:  # one call for the whole batch
            self.allocator.free(np.array(released, dtype=np.int32))

    def __repr__(self) -> str:
        return (f"ReferenceBlockTables(seqs={len(self._seqs)}, block_size={self.block_size}, device={self.device}, "
                f"max_seqs={self.max_seqs}, max_blocks_per_seq={self.max_blocks_per_seq}, "
                f"prefix_caching={self.enable_prefix_caching}, pending_copies={len(self._copies)})")
