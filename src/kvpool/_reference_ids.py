"""Sequence ids of `ReferenceBlockTables`: any hashable; numpy integers are the equal Python ints."""
from __future__ import annotations

import numpy as np

from .errors import InvalidArgumentError


def norm_id(seq_id):
    """A numpy integer id as the equal Python int; any other id as is."""
    return int(seq_id) if isinstance(seq_id, np.integer) else seq_id


def batch_ids(seq_ids) -> tuple:
    """``(as_given, normalised)``: the ids as `BatchTables.seq_ids` keeps them, and as a list of keys."""
    if isinstance(seq_ids, np.ndarray):
        if seq_ids.ndim != 1:
            raise InvalidArgumentError(f"seq_ids of shape {seq_ids.shape} must be 1-D: one id per sequence")
        return seq_ids, [norm_id(s) for s in seq_ids.tolist()]
    given = tuple(seq_ids)
    return given, [norm_id(s) for s in given]


def no_repeats(ids: list, what: str) -> None:
    """Refuse a batch that names a sequence twice (each sequence gets one row, one append)."""
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError(f"{what} lists a sequence twice: {tuple(ids)}; pass each sequence once")
