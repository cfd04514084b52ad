"""Per-sequence block lists and the batch tensors the kernels read, kept by the C++ core.

`BlockTables` keeps, for every live sequence, the ids of the KV blocks that hold its tokens (ids from a
`BlockAllocator`, the same on every tensor-parallel rank) and turns a batch of sequences into int32
tensors on the cache's device: the padded table, the CSR form and the slot mapping. The state and every
batched operation live in the C++ ``SeqTable`` (``csrc/seq_table.{h,cpp}``); this class maps the
server's sequence ids onto it and puts its arrays on the device. The format is documented once, with a
worked example, in ``docs/page_table.md``; the pure-Python twin, `kvpool._reference_tables`, is the
oracle of the tests.

Lifecycle of one sequence (the server calls these):

1. ``hit = add(seq_id, prompt)``: blocks for the prompt; with prefix caching the leading full blocks
   are shared with earlier requests (verified token by token) and ``hit`` prompt tokens need no
   recomputation.
2. ``b = batch([seq_id, ...])``: the tokens not yet computed become this step's new tokens; run
   ``write_kv(..., b.slot_mapping)`` and attention, then ``mark_computed(b)``. Only then are the full
   blocks offered to the prefix cache: a block is cached once its KV is written, never before.
3. Decode, one call per step: ``b = decode_step(seq_ids, token_ids)`` appends one token to every
   sequence and returns the step's tensors at fixed addresses; forward; ``mark_computed(b)``. With
   ``token_ids`` every block that fills is hashed, so a next turn hits the whole conversation.
4. ``fork(parent, child)`` shares all blocks; the first write into a shared partial block copies it
   (copy-on-write): run ``copy_blocks(caches, *pop_copies())`` before the next forward.
5. ``free(seq_id)``.

Host tier (``host_tier=HostKVTier(cache, n)``, docs/host_tier.md): full blocks offered to the prefix cache are
also copied to host blocks, and ``add()`` continues a GPU hit over the host's verified chain (reloads). Before
every forward the server runs ``tier.run(tables.pop_transfers())``.

Hybrid models (sliding-window and full-attention layers): ``group_windows`` gives each KV-cache group's
window (`kvpool.plan.kv_groups`); every group keeps its own block list per sequence, all drawn from the one
allocator, and a windowed group gives back the blocks that leave its window as tokens are computed
(``docs/page_table.md``, "Hybrid models").
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from . import _C
from ._arrays import as_exact_array, as_int, as_prompt, as_token_ids, check_geometry
from ._device_check import checked_device
from .batch_tables import BLOCK_TABLE_PAD, SLOT_PAD, BatchTables  # noqa: F401 (re-exported)
from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError
from .seq_ids import SeqIds
from .step_buffers import StepBuffers


class BlockTables:
    """Block lists of the live sequences of one TP group and the batch tensors built from them.

    Parameters
    ----------
    allocator : kvpool.BlockAllocator
        Hands out block ids (the C++ allocator; its pure-Python twin goes with
        `kvpool._reference_tables.ReferenceBlockTables`); one per TP group.
    block_size : int
        Tokens per block; must equal ``allocator.block_size``.
    device : str or torch.device
        Where the batch tensors go (the cache's device).
    max_seqs : int
        Most sequences in one batch; sizes the decode step's fixed buffers.
    enable_prefix_caching : bool, optional
        Hash full blocks and reuse cached ones; defaults to the allocator's setting.
    max_blocks_per_seq : int, optional
        Most blocks one sequence may hold (``ceil(max_model_len / block_size)``); the width of the decode
        step's block table. Default ``allocator.num_blocks`` (no limit but the pool; the fixed table then
        takes ``max_seqs * num_blocks * 4`` bytes on the device, so pass it for large pools).
    group_windows : sequence of (int or None), optional
        One entry per KV-cache group: None for full attention, else the sliding window in tokens (>= 1);
        ``kv_groups(spec.layer_sliding_windows).windows``. Default ``(None,)``: one full-attention group, the
        single table of every layer. With ``G > 1`` groups the per-group outputs gain a leading group axis
        (``append`` slots ``[G, n]``, `BatchTables` tables ``[G, ...]``; ``batch.group(g)`` is group g's).
    host_tier : kvpool.HostKVTier, optional
        The host-memory tier of the prefix cache (one per BlockTables). Needs prefix caching and ONE
        full-attention KV-cache group (a hybrid model is refused). Then run ``tier.run(tables.pop_transfers())``
        before every forward.

    Notes
    -----
    Sequence ids are any hashables; the batch calls also take a numpy integer array, the fast path
    (integer ids must lie in ``[-2**62, 2**62)``). Every method validates its whole input before it
    changes anything: on error no sequence and no allocator state has changed. Not thread-safe: one
    `BlockTables` belongs to one scheduler thread.
    """

    def __init__(self, allocator, block_size: int, device="cpu", max_seqs: int = 256,
                 enable_prefix_caching: bool | None = None, max_blocks_per_seq: int | None = None,
                 group_windows=None, host_tier=None, _mirror: bool = False, _hash_bits: int = 64):
        if not isinstance(allocator, _C.BlockAllocator):
            raise InvalidArgumentError(
                f"BlockTables needs kvpool.BlockAllocator (the C++ allocator), got {type(allocator).__name__}; "
                "with the pure-Python twin use kvpool._reference_tables.ReferenceBlockTables")
        if as_int(block_size, "block_size") != allocator.block_size:
            raise InvalidArgumentError(
                f"block_size={block_size} differs from the allocator's block_size={allocator.block_size}; "
                "pass the allocator's block size")
        check_geometry(allocator.num_blocks, block_size, "BlockTables")  # slot ids must fit in int32
        max_seqs = as_int(max_seqs, "max_seqs")
        if max_seqs < 1:
            raise InvalidArgumentError(f"max_seqs={max_seqs} must be >= 1 (the largest batch you will build)")
        width = allocator.num_blocks if max_blocks_per_seq is None else as_int(max_blocks_per_seq,
                                                                                "max_blocks_per_seq")
        if width < 1:
            raise InvalidArgumentError(f"max_blocks_per_seq={width} must be >= 1; pass ceil(max_model_len / "
                                       "block_size)")
        self.allocator = allocator
        self.block_size = int(block_size)
        self.device = checked_device(device)
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = width
        if enable_prefix_caching is None:
            enable_prefix_caching = allocator.enable_prefix_caching
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.group_windows = _checked_group_windows(group_windows)
        self.num_groups = len(self.group_windows)
        # _hash_bits < 64 (tests only) keeps that many bits of each block hash: collisions on demand
        self._core = _C.SeqTable(allocator, max_seqs, width, self.enable_prefix_caching, (1 << _hash_bits) - 1,
                                 [0 if w is None else w for w in self.group_windows])
        self.host_tier = None
        if host_tier is not None:
            self._attach(host_tier)
        self._step = StepBuffers(self._core, self.device, mirror=_mirror)
        self._last_step: BatchTables | None = None
        self._ids = SeqIds()
        self._pin = self.device.type == "cuda"
        self._host = None  # pinned staging buffer of batch(); grows
        self._copy_done = None  # CUDA event of the last copy out of self._host

    def _attach(self, tier) -> None:
        """Extends the prefix cache to `tier` (checked here first, so a refused tier stays unbound)."""
        from .tier import HostKVTier  # noqa: PLC0415 (the tier package loads only when used)
        if not isinstance(tier, HostKVTier):
            raise InvalidArgumentError(f"host_tier must be a kvpool.HostKVTier, got {type(tier).__name__}")
        if self.group_windows != (None,):
            raise InvalidArgumentError(
                f"host_tier: group_windows={self.group_windows}; the host tier supports one full-attention KV-cache "
                "group only (a hybrid model's windowed groups are not offloaded): build BlockTables without host_tier")
        if not self.enable_prefix_caching:
            raise InvalidArgumentError("host_tier needs prefix caching (the host tier extends the prefix cache): "
                                       "build the allocator and BlockTables with enable_prefix_caching=True")
        self._core.attach_host_tier(tier._bind(self.allocator))
        self.host_tier = tier

    def pop_transfers(self):
        """Take the copies between the tiers queued since the last call (``host_tier`` only).

        Returns
        -------
        kvpool.tier.Transfers
            The reloads (``add()``'s host hits) and offloads (blocks offered to the prefix cache) of this step;
            run them with ``tier.run(transfers)`` before the forward that reads the reloaded blocks. Their
            blocks stay held until the tier completes the copies.
        """
        if self.host_tier is None:
            raise InvalidArgumentError("pop_transfers(): these BlockTables have no host tier; pass "
                                       "BlockTables(..., host_tier=kvpool.HostKVTier(cache, num_host_blocks))")
        from .tier.host_tier import NO_TRANSFERS, Transfers  # noqa: PLC0415
        core = self.host_tier._core
        if core.pending_reloads == 0 and core.pending_offloads == 0:  # most decode steps: no arrays to build
            return NO_TRANSFERS
        return Transfers(*self._core.pop_transfers())

    def _call(self, method, *args):
        """``self._core.<method>(*args)``, its errors naming non-integer ids as the caller wrote them."""
        try:
            return getattr(self._core, method)(*args)
        except (InvalidArgumentError, BlockIndexError, OutOfBlocksError) as err:
            raise self._ids.named(err) from None

    # ----------------------------------------------------------------- introspection
    @classmethod
    def for_cache(cls, allocator, cache, **kwargs) -> "BlockTables":
        """Tables for ``cache`` (a `kvpool.PagedKVCache`): its block size, device and KV-cache groups.

        Use it for a hybrid model: its layers of different groups share slot tensors, so one table for
        every layer (``group_windows`` left out) would write one layer's KV over another's.

        >>> # tables = BlockTables.for_cache(BlockAllocator(n, 16), cache, max_seqs=256)
        """
        if "group_windows" in kwargs:
            raise InvalidArgumentError("for_cache takes the KV-cache groups from the cache; do not pass group_windows")
        return cls(allocator, cache.block_size, cache.device, group_windows=cache.kv_groups.windows, **kwargs)

    def __contains__(self, seq_id) -> bool:
        try:
            return self._ids.handle(seq_id) in self._core
        except BlockIndexError:
            return False

    def __len__(self) -> int:
        return len(self._core)

    def blocks(self, seq_id, group: int = 0) -> np.ndarray:
        """``[n_blocks] int32`` copy of the block ids of `seq_id` in KV-cache group `group`, in token order;
        ``-1`` where a windowed group released the block (or never allocated it: before the window of a
        prefix hit). ``n_blocks = ceil(num_tokens / block_size)`` in every group."""
        return self._core.blocks(self._ids.handle(seq_id), as_int(group, "blocks(): group"))

    def num_tokens(self, seq_id) -> int:
        """Tokens in `seq_id` (prompt plus appended)."""
        return self._core.num_tokens(self._ids.handle(seq_id))

    def num_computed(self, seq_id) -> int:
        """Leading tokens of `seq_id` whose KV is written (prefix hits plus `mark_computed`)."""
        return self._core.num_computed(self._ids.handle(seq_id))

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
            hashes say (a collision is a counted miss, ``allocator.stats()["hash_collisions"]``). With a host
            tier the hit goes on over the host's blocks (reloads queued for `pop_transfers`; the sequence
            cannot be batched before ``tier.run`` enqueued them), after completing the copies that are done.

        Raises
        ------
        OutOfBlocksError
            Too few free blocks; nothing changed.
        """
        handle = self._ids.new(seq_id)
        if seq_id in self:
            raise InvalidArgumentError(f"seq_id {seq_id!r} already exists: free() it or use a new id")
        tokens, n = as_prompt(seq_id, prompt_tokens)
        context = self.allocator.extra_key(extra) if extra is not None else 0
        if self.host_tier is not None:
            self.host_tier.poll()  # blocks whose copies are done are free (and host blocks readable) for this add
        try:
            hit = self._core.add(handle, tokens, n, context)
        except InvalidArgumentError as err:
            raise self._ids.named(err, {handle: seq_id}) from None
        except OutOfBlocksError as err:
            raise OutOfBlocksError(
                f"add({seq_id!r}) of a {n}-token prompt needs {err.requested} new blocks but {err.available} are "
                "free; free or preempt sequences, or size the pool larger", requested=err.requested,
                available=err.available) from err
        self._ids.register(seq_id, handle)
        return hit

    def append(self, seq_id, n_tokens: int = 1, token_ids=None) -> np.ndarray:
        """Grow `seq_id` by `n_tokens` tokens (decoded or speculative), allocating blocks as they fill.

        If the last block is partial and shared (after `fork`), it is copied first: this sequence gets
        a fresh block and the pair ``(src, dst)`` is queued for `pop_copies`. With ``token_ids``
        (``[n_tokens]`` int) every block the tokens complete is hashed and joins the prefix cache once
        computed; without, this sequence's later blocks are never cached.

        Returns
        -------
        np.ndarray
            ``[n_tokens] int32`` slots (``block_id * block_size + offset``) of the new tokens; ``[G, n_tokens]``
            with ``G > 1`` KV-cache groups.

        Raises
        ------
        OutOfBlocksError
            Too few free blocks; nothing changed.
        """
        n = as_int(n_tokens, f"append({seq_id!r}): n_tokens")
        if n < 1:
            raise InvalidArgumentError(f"append(n_tokens={n}) on seq_id {seq_id!r}: need n_tokens >= 1")
        slots = self._call("append_batch", np.array([self._ids.handle(seq_id)], np.int64), n, as_token_ids(token_ids),
                           False)
        return slots if self.num_groups == 1 else slots.reshape(self.num_groups, n)

    def append_batch(self, seq_ids, n_tokens: int = 1, token_ids=None) -> np.ndarray:
        """`append` to many sequences in one call: ``for s in seq_ids: append(s, n_tokens)``, all or nothing.

        Parameters
        ----------
        seq_ids : sequence of hashable, or np.ndarray of int
            The sequences, each once.
        n_tokens : int
            Tokens appended to each (speculative decoding appends k).
        token_ids : array_like, optional
            ``[b * n_tokens]`` (or ``[b, n_tokens]``) int: the tokens, sequence-major.

        Returns
        -------
        np.ndarray
            ``[b * n_tokens] int32`` slots, sequence-major; ``[G, b * n_tokens]`` with ``G > 1`` groups.

        Raises
        ------
        OutOfBlocksError
            The batch needs more new blocks than are free (``.requested`` counts them all); nothing changed.
        """
        n = as_int(n_tokens, "append_batch(): n_tokens")
        ids, check, _ = self._ids.batch(seq_ids)
        slots = self._call("append_batch", ids, n, as_token_ids(token_ids), check)
        return slots if self.num_groups == 1 else slots.reshape(self.num_groups, -1)

    def fork(self, parent, child) -> None:
        """Make `child` a copy of `parent` sharing all its blocks (beam search, parallel sampling).

        The parent must have all its tokens computed (`mark_computed`), so no shared block is ever
        written by two sequences; the first `append` on either side copies a shared partial block.
        """
        source = self._ids.handle(parent)
        handle = self._ids.new(child)
        if child in self:
            raise InvalidArgumentError(f"fork target seq_id {child!r} already exists: pick a new id")
        try:
            self._core.fork(source, handle)
        except (InvalidArgumentError, BlockIndexError, OutOfBlocksError) as err:
            raise self._ids.named(err, {handle: child}) from None
        self._ids.register(child, handle)

    def free(self, seq_id) -> None:
        """Release `seq_id`'s blocks, in sequence order so that its prefix stays cached longest."""
        self._core.free(self._ids.handle(seq_id))
        self._ids.forget(seq_id)

    def mark_computed(self, seqs, num_computed=None) -> None:
        """Record that KV has been written; offer newly complete blocks to the prefix cache.

        Parameters
        ----------
        seqs : BatchTables, hashable, or sequence of hashable
            A batch returned by `batch` / `decode_step` (its ``seq_lens`` are the new computed
            lengths), one sequence id, or a list of them.
        num_computed : int or sequence of int, optional
            Leading tokens now written, per sequence; defaults to all tokens of each sequence.
        """
        if isinstance(seqs, BatchTables):
            if seqs is self._last_step:  # the decode step's own record: no conversion at all
                self._call("mark_step_computed")
                return
            ids, check, _ = self._ids.batch(seqs.seq_ids)
            lens = seqs.seq_lens_host[: len(ids)].astype(np.int64)
        else:
            listed = seqs if isinstance(seqs, (list, tuple, np.ndarray)) else [seqs]
            ids, check, _ = self._ids.batch(listed)
            lens = None
            if num_computed is not None:
                lens = as_exact_array(np.atleast_1d(num_computed).reshape(-1), np.int64, "mark_computed()",
                                      "num_computed")
                if len(lens) != len(ids):
                    raise InvalidArgumentError(
                        f"mark_computed got {len(ids)} sequences but {len(lens)} lengths; pass one per sequence")
        self._call("mark_computed", ids, lens, check)

    @property
    def pending_copies(self) -> list:
        """Queued copy-on-write ``(src, dst)`` pairs; the queue holds one reference on each block."""
        return self._core.pending_copies()

    def pop_copies(self):
        """Take the queued copy-on-write pairs.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``src [n] int64`` and ``dst [n] int64`` block ids on the device, for
            ``copy_blocks(caches, src, dst)``, which must run before the next forward pass writes.
        """
        src, dst = self._core.pop_copies()
        return torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device)

    def relocate_top(self, n: int):
        """Move every held block among the pool's top ``n`` ids to free lower ids, so ``shrink(n)`` can follow.

        The allocator hands each held top block's references, hash and verified cache entry to a free
        id below ``num_blocks - n`` (least recently freed first); every sequence's block lists (all
        KV-cache groups) and the copy-on-write queue are renamed; decode-step rows naming a moved block
        are re-sent in full at the next `decode_step`. Nothing else may run between this call and the
        copy: run ``copy_blocks(caches, src, dst)`` before any kernel reads the new ids, then
        ``allocator.shrink(n)``.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``src [m] int64`` (ascending) and ``dst [m] int64`` block ids on the device.

        Raises
        ------
        OutOfBlocksError
            Fewer free ids below ``num_blocks - n`` than held blocks above (``.available``: how many
            could move); nothing changed.
        """
        src, dst = self._call("relocate_top", as_int(n, "n"))
        return torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device)

    # ----------------------------------------------------------------- batch tensors
    def decode_step(self, seq_ids, token_ids=None, pad_batch_to: int | None = None) -> BatchTables:
        """One decode step in one call: append one token to each sequence and build the step's tensors.

        Exactly ``for s in seq_ids: append(s)`` then ``decode_batch(seq_ids)``, except that the tensors
        sit at fixed device addresses (CUDA-graph ready; the block table is ``[rows, max_blocks_per_seq]``)
        and only what changed is sent to the device (`last_step_h2d_bytes`).

        Parameters
        ----------
        seq_ids : np.ndarray of int (fast) or sequence of hashable
            The running sequences, each with all its tokens computed.
        token_ids : array_like, optional
            ``[b]`` int: the token each sequence appends (its blocks then join the prefix cache as they fill).
        pad_batch_to : int, optional
            Rows of the returned tensors (a captured graph's batch size), in ``[b, max_seqs]``; padding rows
            have ``seq_len = 0`` (the kernels give zero rows and read nothing), slot -1, a zero table row.

        Returns
        -------
        BatchTables
            Valid until the next `decode_step`. Its CSR form is derived on the device when first read. With
            ``G > 1`` KV-cache groups ``block_table`` is ``[G, rows, max_blocks_per_seq]`` and ``slot_mapping``
            ``[G, rows]`` (``step.group(g)``: group g's, at fixed addresses too).
        """
        ids, check, shown = self._ids.batch(seq_ids)
        pad = -1 if pad_batch_to is None else as_int(pad_batch_to, "pad_batch_to")
        max_len = self._call("decode_step", ids, as_token_ids(token_ids), pad, check)
        rows = len(ids) if pad < 0 else pad
        self._step.publish(rows)
        table, lens, slots, qsl = self._step.views(rows)
        step = BatchTables(shown, table, lens, slots, qsl, self._step.host_lens(rows), len(ids), max_len,
                           self.block_size)
        self._last_step = step
        return step

    @property
    def last_step_h2d_bytes(self) -> int:
        """Host-to-device bytes of the last `decode_step`: ``4 * (3 * rows + 1)`` plus 12 per changed table entry."""
        return self._step.h2d_bytes()

    def decode_batch(self, seq_ids: Sequence, pad_slots_to: int | None = None) -> BatchTables:
        """`batch` for a decode step: every sequence must have exactly one new (uncomputed) token."""
        return self._batch(seq_ids, None, pad_slots_to, decode=True)

    def batch(self, seq_ids: Sequence, num_new_tokens: Iterable[int] | None = None,
              pad_slots_to: int | None = None) -> BatchTables:
        """Build the tensors of one forward step over `seq_ids` (prefill, chunked prefill and decode mixed).

        Parameters
        ----------
        seq_ids : sequence of hashable, or np.ndarray of int
            The batch, ``1 <= len <= max_seqs``, no repeats.
        num_new_tokens : sequence of int, optional
            New tokens to run per sequence (chunked prefill), each in ``0..uncomputed``; defaults to all
            uncomputed tokens. ``seq_lens = computed + new``.
        pad_slots_to : int, optional
            Pad `slot_mapping` with -1 up to this many tokens (fixed shapes for CUDA graphs).

        Returns
        -------
        BatchTables
            Valid until the next `batch` / `decode_batch` call (work queued on the same CUDA stream
            before that call is safe).
        """
        return self._batch(seq_ids, num_new_tokens, pad_slots_to, decode=False)

    def _batch(self, seq_ids, num_new_tokens, pad_slots_to, decode: bool) -> BatchTables:
        ids, check, shown = self._ids.batch(seq_ids)
        fresh = None if num_new_tokens is None else as_exact_array(list(num_new_tokens), np.int64, "batch()",
                                                                    "num_new_tokens")
        pad = -1 if pad_slots_to is None else as_int(pad_slots_to, "pad_slots_to")
        buf, max_blocks, new_tokens, offs = self._call("batch", ids, fresh, pad, decode, check)
        dev = self._to_device(buf)
        v = [dev[offs[k]:offs[k + 1]] for k in range(7)]
        b, g = len(ids), self.num_groups
        lens = buf[offs[1]:offs[2]].copy()
        if g == 1:
            return BatchTables(shown, v[0].view(b, max_blocks), v[1], v[6], v[5], lens, new_tokens, int(lens.max()),
                               self.block_size, csr=(v[2], v[3], v[4]))
        csr = (v[2].view(g, b + 1), v[3].view(g, -1), v[4].view(g, b))  # one CSR per group
        return BatchTables(shown, v[0].view(g, b, max_blocks), v[1], v[6].view(g, -1), v[5], lens, new_tokens,
                           int(lens.max()), self.block_size, csr=csr)

    def _to_device(self, buf: np.ndarray) -> torch.Tensor:
        """One host-to-device copy of a batch's int32 buffer (the buffer itself on the CPU)."""
        host = torch.from_numpy(buf)
        if self.device.type == "cpu":
            return host
        if self._copy_done is not None:  # the last non-blocking copy may still read the pinned buffer
            self._copy_done.synchronize()
        if self._host is None or self._host.numel() < host.numel():
            self._host = torch.empty(max(host.numel(), 4096), dtype=torch.int32, pin_memory=self._pin)
        staged = self._host[: host.numel()]
        staged.copy_(host)
        dev = staged.to(self.device, non_blocking=self._pin)
        if self._pin:
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()
        return dev

    def __repr__(self) -> str:
        groups = "" if self.group_windows == (None,) else f", group_windows={self.group_windows}"
        return (f"BlockTables(seqs={len(self)}, block_size={self.block_size}, device={self.device}, "
                f"max_seqs={self.max_seqs}, max_blocks_per_seq={self.max_blocks_per_seq}, "
                f"prefix_caching={self.enable_prefix_caching}, pending_copies={len(self.pending_copies)}{groups})")


def _checked_group_windows(group_windows) -> tuple:
    """``group_windows`` as a tuple of None (full attention) or int windows >= 1; default ``(None,)``."""
    if group_windows is None:
        return (None,)
    if isinstance(group_windows, (str, bytes)) or not hasattr(group_windows, "__len__") or len(group_windows) == 0:
        raise InvalidArgumentError(
            f"group_windows={group_windows!r} must be a non-empty sequence with one entry per KV-cache group: None "
            "(full attention) or a window in tokens, e.g. kv_groups(spec.layer_sliding_windows).windows")
    windows = []
    for g, w in enumerate(group_windows):
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1):
            raise InvalidArgumentError(f"group_windows[{g}]={w!r} must be None (full attention) or a window of >= 1 "
                                       "tokens")
        windows.append(None if w is None else int(w))
    if len(windows) > _C.SeqTable.MAX_GROUPS:
        raise InvalidArgumentError(f"group_windows has {len(windows)} groups; at most {_C.SeqTable.MAX_GROUPS} "
                                   "(one per attention kind and layer count)")
    return tuple(windows)
