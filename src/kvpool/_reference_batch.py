"""The batch tensors of `ReferenceBlockTables`, built row by row from each sequence's block list.

One builder serves ``batch`` (rows = sequences, width = the longest row) and ``decode_step`` (rows padded
to ``pad_batch_to``, width = ``max_blocks_per_seq``). Padding rows attend to 0 tokens: their table
row, ``seq_lens``, ``kv_last_page_len`` and CSR rows are empty (0) and their slots are `SLOT_PAD`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._arrays import as_int
from ._reference_ids import batch_ids, no_repeats
from .batch_tables import BLOCK_TABLE_PAD, SLOT_PAD, BatchTables
from .errors import InvalidArgumentError


def build_batch(seq_ids, tables: list, computed: np.ndarray, new: np.ndarray, block_size: int, width: int,
                rows: int, num_slots: int, device: torch.device) -> BatchTables:
    """The int32 tensors of one step over ``b = len(tables)`` sequences, for every KV-cache group.

    Parameters
    ----------
    seq_ids : tuple or np.ndarray
        Stored as ``BatchTables.seq_ids`` (the caller's ids, as given).
    tables : list of list of list of int
        ``tables[i][g]``: sequence i's block ids in group g, in token order (-1: released).
    computed, new : np.ndarray
        ``[b] int64``: tokens already computed and this step's new tokens, per sequence
        (``seq_lens = computed + new``).
    block_size : int
        Tokens per block.
    width : int
        Columns of ``block_table`` (>= every row's ``ceil(seq_len / block_size)``).
    rows : int
        Rows of the tensors, ``>= b``; rows past ``b`` are padding.
    num_slots : int
        Length of ``slot_mapping``, ``>= new.sum()``; entries past the new tokens are `SLOT_PAD`.
    device : torch.device
        Where the tensors go.

    Returns
    -------
    BatchTables
        With its CSR form given explicitly. One group: today's shapes. G > 1 groups: ``block_table
        [G, rows, width]``, ``slot_mapping [G, num_slots]``, ``kv_indptr [G, rows + 1]``,
        ``kv_indices [G, nnz]``, ``kv_last_page_len [G, rows]``; ``seq_lens`` and
        ``query_start_loc`` shared. Released positions read `BLOCK_TABLE_PAD` (0).
    """
    b, groups = len(tables), len(tables[0]) if tables else 1
    lens = np.zeros(rows, dtype=np.int64)
    lens[:b] = computed + new
    nblk = -(-lens // block_size)
    qsl = np.zeros(rows + 1, dtype=np.int64)
    qsl[1:b + 1] = np.cumsum(new)
    qsl[b + 1:] = qsl[b]
    parts = [_group_arrays([t[g] for t in tables], computed, lens, nblk, qsl, block_size, width, num_slots)
             for g in range(groups)]
    indptr = np.concatenate([[0], np.cumsum(nblk)])
    last = np.where(lens > 0, lens - block_size * (nblk - 1), 0)
    stacked = [np.stack([p[k] for p in parts]) for k in range(3)]  # table, slots, indices: [G, ...]
    dev = _on_device([stacked[0].reshape(-1), lens, np.tile(indptr, groups), stacked[2].reshape(-1),
                      np.tile(last, groups), qsl, stacked[1].reshape(-1)], device)
    shape = (lambda *dims: dims) if groups > 1 else (lambda *dims: dims[1:])
    nnz = stacked[2].shape[1]
    return BatchTables(
        seq_ids=seq_ids,
        block_table=dev[0].view(*shape(groups, rows, width)),
        seq_lens=dev[1],
        slot_mapping=dev[6].view(*shape(groups, num_slots)),
        query_start_loc=dev[5],
        seq_lens_host=lens.astype(np.int32),
        num_new_tokens=int(new.sum()),
        max_seq_len=int(lens.max()),
        block_size=block_size,
        csr=(dev[2].view(*shape(groups, rows + 1)), dev[3].view(*shape(groups, nnz)),
             dev[4].view(*shape(groups, rows))),
    )


def _group_arrays(blocks: list, computed, lens, nblk, qsl, block_size: int, width: int, num_slots: int) -> tuple:
    """One group's ``(table [rows, width], slots [num_slots], indices [nnz])``, released positions as padding."""
    rows = len(lens)
    table = np.full((rows, width), BLOCK_TABLE_PAD, dtype=np.int32)  # int32: [max_seqs, W] can be large
    slots = np.full(num_slots, SLOT_PAD, dtype=np.int64)
    for i, ids in enumerate(blocks):
        row = np.asarray(ids[:nblk[i]], dtype=np.int64)
        table[i, :nblk[i]] = np.where(row < 0, BLOCK_TABLE_PAD, row)
        pos = np.arange(computed[i], lens[i])
        assert (row[pos // block_size] >= 0).all(), "a new token at a released position"
        slots[qsl[i]:qsl[i + 1]] = row[pos // block_size] * block_size + pos % block_size
    indices = np.concatenate([table[i, :nblk[i]] for i in range(rows)])
    return table, slots, indices


def _on_device(arrays: list, device: torch.device) -> list:
    """int32 views of one buffer holding `arrays` end to end: one host-to-device copy."""
    flat = np.concatenate([a.astype(np.int32, copy=False) for a in arrays])
    buffer = torch.from_numpy(flat).to(device)
    ends = np.cumsum([len(a) for a in arrays]).tolist()
    return [buffer[start:end] for start, end in zip([0] + ends[:-1], ends)]


class BatchTensorsMixin:
    """`batch`, `decode_batch` and `decode_step` of `ReferenceBlockTables` (which holds the state they read)."""

    def _lookup_batch(self, seq_ids, what: str) -> tuple:
        """``(as_given, ids, seqs)`` of a batch: 1..max_seqs known sequences, no repeats."""
        given, ids = batch_ids(seq_ids)
        if not 1 <= len(ids) <= self.max_seqs:
            raise InvalidArgumentError(f"{what} of {len(ids)} sequences; need 1..max_seqs={self.max_seqs} "
                                       "(raise max_seqs when building BlockTables)")
        seqs = [self._get(s) for s in ids]
        no_repeats(ids, what)
        return given, ids, seqs

    def decode_batch(self, seq_ids: Sequence, pad_slots_to: int | None = None) -> BatchTables:
        """`batch` for a decode step: every sequence must have exactly one new (uncomputed) token."""
        return self.batch(seq_ids, pad_slots_to=pad_slots_to, _decode=True)

    def batch(self, seq_ids: Sequence, num_new_tokens=None, pad_slots_to: int | None = None, *,
              _decode: bool = False) -> BatchTables:
        """Build the tensors of one forward step over `seq_ids` (prefill, chunked prefill and decode mixed).

        Parameters
        ----------
        seq_ids : sequence of hashable or np.ndarray
            The batch, ``1 <= len <= max_seqs``, no repeats.
        num_new_tokens : sequence of int, optional
            New tokens per sequence, each in ``0..uncomputed``; defaults to all uncomputed tokens.
        pad_slots_to : int, optional
            Pad `slot_mapping` with -1 up to this many tokens.

        Returns
        -------
        BatchTables
            ``block_table`` is ``[b, longest row]``; with G > 1 KV-cache groups ``[G, b, longest row]`` and
            ``slot_mapping [G, tokens]`` (``batch.group(g)``: group g's, with the single-group shapes).
        """
        given, ids, seqs = self._lookup_batch(seq_ids, "batch")
        computed = np.array([s.num_computed for s in seqs], dtype=np.int64)
        uncomputed = np.array([s.num_tokens for s in seqs], dtype=np.int64) - computed
        if _decode and (uncomputed != 1).any():
            bad = int(np.argmax(uncomputed != 1))
            raise InvalidArgumentError(
                f"decode_batch: seq_id {ids[bad]!r} has {uncomputed[bad]} uncomputed tokens, not 1; append() "
                "one token per step and mark_computed() after each forward, or use batch()")
        new = uncomputed if num_new_tokens is None else np.asarray(list(num_new_tokens), dtype=np.int64).reshape(-1)
        if len(new) != len(ids) or (new < 0).any() or (new > uncomputed).any():
            raise InvalidArgumentError(
                f"num_new_tokens={new.tolist()} must give one count per sequence in 0..{uncomputed.tolist()}")
        lens = computed + new
        if (lens < 1).any():
            raise InvalidArgumentError(f"batch: sequence {ids[int(np.argmin(lens))]!r} would attend to 0 tokens")
        t = int(new.sum())
        num_slots = t if pad_slots_to is None else int(pad_slots_to)
        if num_slots < t:
            raise InvalidArgumentError(f"pad_slots_to={pad_slots_to} is below the {t} new tokens of this batch")
        width = int((-(-lens // self.block_size)).max())
        return build_batch(given, [s.tables for s in seqs], computed, new, self.block_size, width, len(ids),
                           num_slots, self.device)

    def decode_step(self, seq_ids, token_ids=None, pad_batch_to: int | None = None) -> BatchTables:
        """Append one token to each sequence and build the decode batch, all or nothing.

        Exactly ``append_batch(seq_ids, 1, token_ids)`` followed by the decode batch, with the table
        ``[rows, max_blocks_per_seq]`` and ``rows = pad_batch_to or len(seq_ids)``.

        Parameters
        ----------
        seq_ids : sequence of hashable or np.ndarray
            ``1..max_seqs`` distinct sequences, each with all its tokens computed.
        token_ids : array-like of int, optional
            ``[b]`` the tokens appended (their full blocks join the prefix cache once computed).
        pad_batch_to : int, optional
            Rows of the tensors, in ``[b, max_seqs]``; padding rows have ``seq_len = 0``, a table row
            and ``kv_last_page_len`` of 0, slot `SLOT_PAD` and repeat ``query_start_loc[b]``.

        Returns
        -------
        BatchTables
            ``block_table [rows, W]``, ``seq_lens [rows]``, ``slot_mapping [rows]``,
            ``query_start_loc [rows + 1]``, CSR rows, all int32; ``num_new_tokens = b``. With G > 1
            KV-cache groups ``block_table [G, rows, W]`` and ``slot_mapping [G, rows]``.
        """
        given, ids, seqs = self._lookup_batch(seq_ids, "decode_step")
        for seq_id, seq in zip(ids, seqs):
            if seq.num_computed != seq.num_tokens:
                raise InvalidArgumentError(
                    f"decode_step: seq_id {seq_id!r} has {seq.num_tokens - seq.num_computed} uncomputed tokens; "
                    "run their forward (batch()) and mark_computed() first")
        rows = len(ids) if pad_batch_to is None else as_int(pad_batch_to, "decode_step: pad_batch_to")
        if not len(ids) <= rows <= self.max_seqs:
            raise InvalidArgumentError(f"decode_step: pad_batch_to={pad_batch_to} must lie in [{len(ids)}, "
                                       f"max_seqs={self.max_seqs}] (the batch size .. the largest batch)")
        self.append_batch(ids, 1, token_ids)
        computed = np.array([s.num_computed for s in seqs], dtype=np.int64)
        return build_batch(given, [s.tables for s in seqs], computed, np.ones(len(ids), dtype=np.int64),
                           self.block_size, self.max_blocks_per_seq, rows, rows, self.device)
