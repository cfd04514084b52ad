"""Per-sequence block lists and the batch tensors the kernels read.

`BlockTables` keeps, for every live sequence, the ids of the KV blocks that hold its tokens (ids from a
`BlockAllocator`, the same on every tensor-parallel rank) and turns a batch of sequences into int32
tensors on the cache's device: the padded table, the CSR form and the slot mapping. The format is
documented once, with a worked example, in ``docs/page_table.md``.

Lifecycle of one sequence (the server calls these):

1. ``hit = add(seq_id, prompt)``: blocks for the prompt; with prefix caching the leading full blocks
   are shared with earlier requests and ``hit`` prompt tokens need no recomputation.
2. ``b = batch([seq_id, ...])``: the tokens not yet computed become this step's new tokens; run
   ``write_kv(..., b.slot_mapping)`` and attention, then ``mark_computed(b)``. Only then are the full
   prompt blocks offered to the prefix cache: a block is cached once its KV is written, never before.
3. ``append(seq_id)`` per decoded token, then ``decode_batch(...)``, forward, ``mark_computed``.
4. ``fork(parent, child)`` shares all blocks; the first write into a shared partial block copies it
   (copy-on-write): run ``copy_blocks(caches, *pop_copies())`` before the next forward.
5. ``free(seq_id)``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from ._arrays import as_int, check_geometry
from ._device_check import checked_device
from .batch_tables import BLOCK_TABLE_PAD, SLOT_PAD, BatchTables  # noqa: F401 (re-exported)
from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError


class _Seq:
    """One sequence: its blocks (a growable int32 array), token counts and prompt block hashes."""

    __slots__ = ("blocks", "num_blocks", "num_tokens", "num_computed", "hashes", "num_cached", "shared_tail",
                 "prompt", "context", "chain")

    def __init__(self, blocks: np.ndarray, num_tokens: int, num_computed: int, hashes: np.ndarray,
                 num_cached: int, prompt: np.ndarray | None = None, context: int = 0, chain: int = 0):
        capacity = max(4, 1 << int(len(blocks)).bit_length())
        self.blocks = np.empty(capacity, dtype=np.int32)
        self.blocks[: len(blocks)] = blocks
        self.num_blocks = len(blocks)
        self.num_tokens = num_tokens      # tokens in the sequence (prompt + appended)
        self.num_computed = num_computed  # leading tokens whose KV is written (marked computed)
        self.hashes = hashes              # uint64 hash of each full prompt block
        self.num_cached = num_cached      # leading blocks already offered to the prefix cache
        self.shared_tail = False          # partial last block may be shared (set by fork)
        self.prompt = prompt              # [n] int32 prompt tokens (compared on every prefix hit)
        self.context = context            # keyed digest of the sequence's salt (`extra`)
        self.chain = chain                # verified-cache chain value after the num_cached blocks

    @property
    def ids(self) -> np.ndarray:
        return self.blocks[: self.num_blocks]

    def push(self, new_ids: np.ndarray) -> None:
        need = self.num_blocks + len(new_ids)
        if need > len(self.blocks):
            grown = np.empty(max(need, 2 * len(self.blocks)), dtype=np.int32)
            grown[: self.num_blocks] = self.ids
            self.blocks = grown
        self.blocks[self.num_blocks: need] = new_ids
        self.num_blocks = need

    def clone(self) -> "_Seq":
        return _Seq(self.ids.copy(), self.num_tokens, self.num_computed, self.hashes, self.num_cached,
                    self.prompt, self.context, self.chain)


def _cdiv(a, b):
    return -(-a // b)


class BlockTables:
    """Block lists of the live sequences of one TP group and the batch tensors built from them.

    Parameters
    ----------
    allocator : BlockAllocator
        Hands out block ids (``kvpool.BlockAllocator`` or its pure-Python twin); one per TP group.
    block_size : int
        Tokens per block; must equal ``allocator.block_size``.
    device : str or torch.device
        Where the batch tensors go (the cache's device).
    max_seqs : int
        Most sequences in one batch; sizes the reused host/device buffers.
    enable_prefix_caching : bool, optional
        Hash prompt blocks and reuse cached ones; defaults to the allocator's setting.
    """

    def __init__(self, allocator, block_size: int, device="cpu", max_seqs: int = 256,
                 enable_prefix_caching: bool | None = None):
        if int(block_size) != int(allocator.block_size):
            raise InvalidArgumentError(
                f"block_size={block_size} differs from the allocator's block_size={allocator.block_size}; "
                "pass the allocator's block size")
        check_geometry(allocator.num_blocks, block_size, "BlockTables")  # slot ids must fit in int32
        if int(max_seqs) < 1:
            raise InvalidArgumentError(f"max_seqs={max_seqs} must be >= 1 (the largest batch you will build)")
        self.allocator = allocator
        self.block_size = int(block_size)
        self.device = checked_device(device)  # an absent CUDA device: one clear line
        self.max_seqs = int(max_seqs)
        if enable_prefix_caching is None:
            enable_prefix_caching = bool(getattr(allocator, "enable_prefix_caching", True))
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._seqs: dict = {}
        self._copies: list[tuple[int, int]] = []  # queued copy-on-write (src, dst) pairs
        self._queued: dict[int, int] = {}  # block id -> references the copy queue holds on it
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._host = torch.empty(0, dtype=torch.int32)
        self._dev = torch.empty(0, dtype=torch.int32, device=self.device)
        self._copy_done = None  # CUDA event of the last host-to-device copy out of self._host
        self._ensure_capacity(self.max_seqs * 64)

    # ----------------------------------------------------------------- introspection
    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def _get(self, seq_id) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise BlockIndexError(f"unknown seq_id {seq_id!r}: add() it first (or it was already freed)")
        return seq

    def blocks(self, seq_id) -> np.ndarray:
        """``[n_blocks] int32`` copy of the block ids of `seq_id`, in token order."""
        return self._get(seq_id).ids.copy()

    def num_tokens(self, seq_id) -> int:
        """Tokens in `seq_id` (prompt plus appended)."""
        return self._get(seq_id).num_tokens

    def num_computed(self, seq_id) -> int:
        """Leading tokens of `seq_id` whose KV is written (prefix hits plus `mark_computed`)."""
        return self._get(seq_id).num_computed

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
            Salt mixed into the block hashes: the per-tenant / per-LoRA cache salt (vLLM's
            ``cache_salt``). Sequences with different salts never share a block; see
            ``hash_block_tokens``.

        Returns
        -------
        int
            Prompt tokens found in the prefix cache (a multiple of `block_size`); their KV is already in
            the blocks, the server computes only the rest. Never the whole prompt: the last token is
            always recomputed, since its logits are needed. Every hit is verified: the cached blocks
            hold exactly these tokens after exactly this prefix, under the same salt, whatever the
            hashes say (a collision is a counted miss, ``allocator.stats()["hash_collisions"]``).

        Raises
        ------
        OutOfBlocksError
            Too few free blocks; nothing changed.
        """
        if seq_id in self._seqs:
            raise InvalidArgumentError(f"seq_id {seq_id!r} already exists: free() it or use a new id")
        raw = np.asarray(prompt_tokens)
        if raw.size == 0:
            raise InvalidArgumentError(f"prompt of seq_id {seq_id!r} has 0 tokens; it needs at least 1")
        if raw.dtype.kind not in "iu":
            raise InvalidArgumentError(f"prompt_tokens of seq_id {seq_id!r} must be integer token ids or a token "
                                       f"count, got dtype {raw.dtype}")
        if raw.ndim == 0:
            tokens, n = None, int(raw)
        else:
            if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int32).max):
                raise InvalidArgumentError(f"prompt_tokens of seq_id {seq_id!r} hold ids outside [0, 2**31): "
                                           f"{raw.min()}..{raw.max()}")
            tokens = np.ascontiguousarray(raw, dtype=np.int32).reshape(-1)
            n = len(tokens)
        if n < 1:
            raise InvalidArgumentError(f"prompt of seq_id {seq_id!r} has {n} tokens; it needs at least 1")
        bs = self.block_size
        total = _cdiv(n, bs)
        if not (self.enable_prefix_caching and tokens is not None and n >= bs):
            blocks = self._allocate(total, f"add({seq_id!r}) of a {n}-token prompt")
            self._seqs[seq_id] = _Seq(blocks, n, 0, np.empty(0, dtype=np.uint64), 0)
            return 0
        context = self.allocator.extra_key(extra)
        hashes = np.asarray(self._hash(tokens, extra), dtype=np.uint64)
        # Match only blocks entirely before the last token: it must be recomputed for its logits.
        matchable = (n - 1) // bs
        try:  # one all-or-nothing call: every hit's tokens compared, then the fresh blocks
            blocks, hits, chain = self.allocator.allocate_with_prefix(
                total, hashes[:matchable], tokens[:matchable * bs], context)
        except OutOfBlocksError as err:
            raise OutOfBlocksError(
                f"add({seq_id!r}) of a {n}-token prompt needs {err.requested} new blocks but {err.available} are "
                "free; free or preempt sequences, or size the pool larger", requested=err.requested,
                available=err.available) from err
        self._seqs[seq_id] = _Seq(np.asarray(blocks, dtype=np.int32), n, hits * bs, hashes, hits, tokens, context,
                                  chain)
        return hits * bs

    def _hash(self, tokens: np.ndarray, extra) -> np.ndarray:
        """``[n // block_size] uint64`` block hashes under the allocator's key (tests inject weak ones here)."""
        return self.allocator.hash_tokens(tokens, extra)

    def _allocate(self, n: int, what: str) -> np.ndarray:
        if n <= 0:
            return np.empty(0, dtype=np.int32)
        try:
            return np.asarray(self.allocator.allocate(n), dtype=np.int32)
        except OutOfBlocksError as err:
            raise OutOfBlocksError(
                f"{what} needs {n} new blocks but {err.available} are free; free or preempt sequences, "
                "or size the pool larger", requested=n, available=err.available) from err

    def append(self, seq_id, n_tokens: int = 1) -> np.ndarray:
        """Grow `seq_id` by `n_tokens` tokens (decoded or speculative), allocating blocks as they fill.

        If the last block is partial and shared (after `fork`), it is copied first: this sequence gets
        a fresh block and the pair ``(src, dst)`` is queued for `pop_copies`.

        Returns
        -------
        np.ndarray
            ``[n_tokens] int32`` slots (``block_id * block_size + offset``) of the new tokens.

        Raises
        ------
        OutOfBlocksError
            Too few free blocks; nothing changed.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            self._get(seq_id)  # raises the unknown-id error
        n_tokens = as_int(n_tokens, f"append({seq_id!r}): n_tokens")
        if n_tokens < 1:
            raise InvalidArgumentError(f"append(n_tokens={n_tokens}) on seq_id {seq_id!r}: need n_tokens >= 1")
        bs = self.block_size
        old = seq.num_tokens
        offset = old % bs
        if n_tokens == 1 and offset and not seq.shared_tail:  # hot path: one token into a private block
            slot = np.array([int(seq.blocks[seq.num_blocks - 1]) * bs + offset], dtype=np.int32)
            seq.num_tokens = old + 1  # only once nothing can fail any more
            return slot
        cow = False
        if offset and seq.shared_tail:
            last = int(seq.blocks[seq.num_blocks - 1])
            # Holders other than the copy queue; a shared block must not be written in place.
            cow = int(self.allocator.refcounts([last])[0]) - self._queued.get(last, 0) > 1
        need = _cdiv(old + n_tokens, bs) - seq.num_blocks + (1 if cow else 0)
        fresh = self._allocate(need, f"append({seq_id!r}, {n_tokens})")
        if cow:
            src, dst = int(seq.blocks[seq.num_blocks - 1]), int(fresh[0])
            # This sequence's reference on src passes to the copy queue, which also takes one on dst:
            # until pop_copies() neither block can be handed out and overwritten before the copy runs.
            self.allocator.incref([dst])
            self._copies.append((src, dst))
            self._queued[src] = self._queued.get(src, 0) + 1
            self._queued[dst] = self._queued.get(dst, 0) + 1
            seq.blocks[seq.num_blocks - 1] = dst
            fresh = fresh[1:]
        seq.shared_tail = False  # the tail is now private (copied, not shared, or a fresh block)
        seq.push(fresh)
        seq.num_tokens = old + n_tokens
        pos = np.arange(old, old + n_tokens)
        return (seq.ids[pos // bs].astype(np.int64) * bs + pos % bs).astype(np.int32)

    def fork(self, parent, child) -> None:
        """Make `child` a copy of `parent` sharing all its blocks (beam search, parallel sampling).

        The parent must have all its tokens computed (`mark_computed`), so no shared block is ever
        written by two sequences; the first `append` on either side copies a shared partial block.
        """
        seq = self._get(parent)
        if child in self._seqs:
            raise InvalidArgumentError(f"fork target seq_id {child!r} already exists: pick a new id")
        if seq.num_computed != seq.num_tokens:
            raise InvalidArgumentError(
                f"fork({parent!r}, {child!r}): parent has {seq.num_tokens - seq.num_computed} tokens not yet "
                "computed; run the forward and mark_computed() first so no shared block is written twice")
        self.allocator.incref(seq.ids)
        twin = seq.clone()
        seq.shared_tail = twin.shared_tail = seq.num_tokens % self.block_size != 0
        self._seqs[child] = twin

    def free(self, seq_id) -> None:
        """Release `seq_id`'s blocks, in sequence order so that its prefix stays cached longest."""
        seq = self._get(seq_id)
        self.allocator.free(seq.ids)
        del self._seqs[seq_id]

    def mark_computed(self, seqs, num_computed=None) -> None:
        """Record that KV has been written; offer newly complete prompt blocks to the prefix cache.

        Parameters
        ----------
        seqs : BatchTables, hashable, or sequence of hashable
            A batch returned by `batch` (its ``seq_lens`` are the new computed lengths), one
            sequence id, or a list of them.
        num_computed : int or sequence of int, optional
            Leading tokens now written, per sequence; defaults to all tokens of each sequence.
        """
        if isinstance(seqs, BatchTables):
            ids, lens = list(seqs.seq_ids), seqs.seq_lens_host.tolist()
        else:
            ids = list(seqs) if isinstance(seqs, (list, tuple, np.ndarray)) else [seqs]
            if num_computed is None:
                lens = [None] * len(ids)
            else:
                lens = [int(x) for x in np.atleast_1d(num_computed)]
                if len(lens) != len(ids):
                    raise InvalidArgumentError(
                        f"mark_computed got {len(ids)} sequences but {len(lens)} lengths; pass one per sequence")
        found = [self._get(s) for s in ids]
        for seq_id, seq, n in zip(ids, found, lens):  # validate everything before changing anything
            if n is not None and not seq.num_computed <= n <= seq.num_tokens:
                raise InvalidArgumentError(
                    f"mark_computed({seq_id!r}, {n}): must lie in [{seq.num_computed}, {seq.num_tokens}] "
                    "(computed so far, tokens in the sequence)")
        for seq, n in zip(found, lens):
            seq.num_computed = seq.num_tokens if n is None else n
            if seq.num_cached == len(seq.hashes):
                continue  # every hashed prompt block already offered (the decode steady state)
            full = min(seq.num_computed // self.block_size, len(seq.hashes))
            if self.enable_prefix_caching and full > seq.num_cached:
                bs, first = self.block_size, seq.num_cached
                seq.chain = self.allocator.cache_blocks_verified(
                    seq.ids[first:full], seq.hashes[first:full], seq.prompt[first * bs:full * bs], seq.context,
                    seq.chain)
                seq.num_cached = full

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
        src = torch.from_numpy(arr[:, 0].copy()).to(self.device)
        dst = torch.from_numpy(arr[:, 1].copy()).to(self.device)
        return src, dst

    # ----------------------------------------------------------------- batch tensors
    def _ensure_capacity(self, n: int) -> None:
        if n <= self._host.numel():
            return
        n = max(n, 2 * self._host.numel())
        self._sync_host()
        self._host = torch.empty(n, dtype=torch.int32, pin_memory=self._pin)
        self._dev = self._host if self.device.type == "cpu" else torch.empty(n, dtype=torch.int32,
                                                                                device=self.device)

    def _sync_host(self) -> None:
        # The previous non-blocking copy may still be reading the pinned buffer we are about to refill.
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None

    def decode_batch(self, seq_ids: Sequence, pad_slots_to: int | None = None) -> BatchTables:
        """`batch` for a decode step: every sequence must have exactly one new (uncomputed) token."""
        return self.batch(seq_ids, pad_slots_to=pad_slots_to, _decode=True)

    def batch(self, seq_ids: Sequence, num_new_tokens: Iterable[int] | None = None,
              pad_slots_to: int | None = None, *, _decode: bool = False) -> BatchTables:
        """Build the tensors of one forward step over `seq_ids` (prefill, chunked prefill and decode mixed).

        Parameters
        ----------
        seq_ids : sequence of hashable
            The batch, ``1 <= len <= max_seqs``, no repeats.
        num_new_tokens : sequence of int, optional
            New tokens to run per sequence (chunked prefill), each in ``0..uncomputed``; defaults to all
            uncomputed tokens. ``seq_lens = computed + new``.
        pad_slots_to : int, optional
            Pad `slot_mapping` with -1 up to this many tokens (fixed shapes for CUDA graphs).

        Returns
        -------
        BatchTables
        """
        seq_ids = tuple(seq_ids)
        b = len(seq_ids)
        if not 1 <= b <= self.max_seqs:
            raise InvalidArgumentError(f"batch of {b} sequences; need 1..max_seqs={self.max_seqs} "
                                       "(raise max_seqs when building BlockTables)")
        seqs = [self._get(s) for s in seq_ids]
        if len(set(seq_ids)) != b:
            raise InvalidArgumentError(f"batch lists a sequence twice: {seq_ids}")
        computed = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=b)
        uncomputed = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=b) - computed
        if _decode and (uncomputed != 1).any():
            bad = int(np.argmax(uncomputed != 1))
            raise InvalidArgumentError(
                f"decode_batch: seq_id {seq_ids[bad]!r} has {uncomputed[bad]} uncomputed tokens, not 1; append() "
                "one token per step and mark_computed() after each forward, or use batch()")
        if num_new_tokens is None:
            new = uncomputed
        else:
            new = np.asarray(list(num_new_tokens), dtype=np.int64).reshape(-1)
            if len(new) != b or (new < 0).any() or (new > uncomputed).any():
                raise InvalidArgumentError(
                    f"num_new_tokens={new.tolist()} must give one count per sequence in 0..{uncomputed.tolist()}")
        lens = computed + new
        if (lens < 1).any():
            raise InvalidArgumentError(f"batch: sequence {seq_ids[int(np.argmin(lens))]!r} would attend to 0 tokens")
        bs = self.block_size
        nblk = (lens + bs - 1) // bs
        max_blocks = int(nblk.max())
        nnz = int(nblk.sum())
        t = int(new.sum())
        padded = t if pad_slots_to is None else int(pad_slots_to)
        if padded < t:
            raise InvalidArgumentError(f"pad_slots_to={pad_slots_to} is below the {t} new tokens of this batch")

        # One flat int32 buffer, one host-to-device copy: table | lens | indptr | indices | last | qsl | slots.
        sizes = (b * max_blocks, b, b + 1, nnz, b, b + 1, padded)
        offs = np.concatenate([[0], np.cumsum(sizes)])
        self._ensure_capacity(int(offs[-1]))
        self._sync_host()
        host = self._host.numpy()
        indices = host[offs[3]:offs[4]]
        np.concatenate([s.blocks[:k] for s, k in zip(seqs, nblk.tolist())], out=indices)
        indptr = host[offs[2]:offs[3]]
        indptr[0] = 0
        np.cumsum(nblk, out=indptr[1:])
        table = host[offs[0]:offs[1]].reshape(b, max_blocks)
        table.fill(BLOCK_TABLE_PAD)
        starts = np.repeat(indptr[:-1], nblk)
        table[np.repeat(np.arange(b), nblk), np.arange(nnz) - starts] = indices
        host[offs[1]:offs[2]] = lens
        host[offs[4]:offs[5]] = lens - bs * (nblk - 1)
        qsl = host[offs[5]:offs[6]]
        qsl[0] = 0
        np.cumsum(new, out=qsl[1:])
        rows = np.repeat(np.arange(b), new)
        pos = np.arange(t) - np.repeat(qsl[:-1].astype(np.int64) - computed, new)
        slots = host[offs[6]:offs[7]]
        slots[:t] = table[rows, pos // bs].astype(np.int64) * bs + pos % bs
        slots[t:] = SLOT_PAD

        total = int(offs[-1])
        if self._dev is self._host:
            dev = self._host[:total]
        else:
            dev = self._dev[:total]
            dev.copy_(self._host[:total], non_blocking=self._pin)
            if self._pin:
                self._copy_done = torch.cuda.Event()
                self._copy_done.record()
        views = [dev[int(offs[k]):int(offs[k + 1])] for k in range(7)]
        return BatchTables(
            seq_ids=seq_ids,
            block_table=views[0].view(b, max_blocks),
            seq_lens=views[1],
            query_start_loc=views[5],
            slot_mapping=views[6],
            seq_lens_host=lens.astype(np.int32),
            num_new_tokens=t,
            max_seq_len=int(lens.max()),
            block_size=bs,
            csr=(views[2], views[3], views[4]),
        )

    def __repr__(self) -> str:
        return (f"BlockTables(seqs={len(self._seqs)}, block_size={self.block_size}, device={self.device}, "
                f"max_seqs={self.max_seqs}, prefix_caching={self.enable_prefix_caching}, "
                f"pending_copies={len(self._copies)})")
