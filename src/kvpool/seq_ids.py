"""The server's sequence ids as the int64 ids of the C++ core.

A server names its sequences with any hashable. Integers in ``[-2**62, 2**62)`` are the core's ids as
they are (the fast path: a numpy integer array crosses into C++ without a Python loop); every other
hashable gets a handle from ``2**62`` up, which integer ids never reach. Errors from the core name
sequences by their handles; `SeqIds.named` puts the caller's ids back into the message.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError

ID_LIMIT = 1 << 62  # integer ids lie in [-2**62, 2**62); other hashables get handles from 2**62 up


def _is_int(seq_id) -> bool:
    return type(seq_id) is int or isinstance(seq_id, (np.integer, bool))


class SeqIds:
    """Handles of the non-integer sequence ids of one `BlockTables`."""

    def __init__(self):
        self._handles: dict = {}  # non-integer seq_id -> int64 handle (>= 2**62)
        self._next = ID_LIMIT

    def handle(self, seq_id) -> int:
        """The core's id of an existing sequence (BlockIndexError when it is unknown)."""
        if _is_int(seq_id):
            value = int(seq_id)
            if -ID_LIMIT <= value < ID_LIMIT:
                return value
            raise BlockIndexError(f"unknown seq_id {seq_id!r}: add() it first (integer ids lie in [-2**62, 2**62))")
        handle = self._handles.get(seq_id)
        if handle is None:
            raise BlockIndexError(f"unknown seq_id {seq_id!r}: add() it first (or it was already freed)")
        return handle

    def new(self, seq_id) -> int:
        """The core's id for a sequence about to be added (not registered until `register`)."""
        if _is_int(seq_id):
            value = int(seq_id)
            if not -ID_LIMIT <= value < ID_LIMIT:
                raise InvalidArgumentError(f"seq_id {value} is outside [-2**62, 2**62); use a smaller integer or "
                                           "any non-integer hashable")
            return value
        try:
            hash(seq_id)
        except TypeError:
            raise InvalidArgumentError(f"seq_id {seq_id!r} is not hashable; use an int or a hashable") from None
        return self._handles.get(seq_id, self._next)

    def register(self, seq_id, handle: int) -> None:
        """`seq_id` now exists in the core under `handle` (from `new`)."""
        if handle >= ID_LIMIT:
            self._handles[seq_id] = handle
            self._next += 1

    def forget(self, seq_id) -> None:
        self._handles.pop(seq_id, None)

    def batch(self, seq_ids) -> tuple:
        """``(int64 ids for the core, range-check them?, the ids as the batch reports them)``."""
        if type(seq_ids) is np.ndarray and seq_ids.dtype == np.int64 and seq_ids.ndim == 1:
            return seq_ids, True, seq_ids
        if isinstance(seq_ids, np.ndarray):
            if seq_ids.dtype.kind not in "iu" or seq_ids.ndim != 1:
                raise InvalidArgumentError(f"seq_ids array must be 1-D integers, got {seq_ids.dtype} "
                                           f"shape {seq_ids.shape}")
            return seq_ids.astype(np.int64), True, seq_ids
        listed = tuple(seq_ids)
        return np.fromiter((self.handle(s) for s in listed), np.int64, len(listed)), False, listed

    def named(self, err, extra: dict | None = None):
        """``err`` with the core's handles of non-integer ids replaced by the ids themselves."""
        message = str(err)
        names = {**{h: s for s, h in self._handles.items()}, **(extra or {})}
        for handle, seq_id in names.items():
            if handle >= ID_LIMIT:  # handles are >= 2**62: no other number in a message has their digits
                message = re.sub(rf"\b{handle}\b", repr(seq_id), message)
        if message == str(err):
            return err
        return type(err)(message, *((err.requested, err.available) if isinstance(err, OutOfBlocksError) else ()))
