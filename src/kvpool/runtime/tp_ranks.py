"""The ``tp_rank`` of every rank of a sizing group must cover each shard equally often.

Two ranks that both think they are ``tp_rank`` 0 would each hold the same KV heads while another
shard's heads are held by nobody: the server computes garbage without a single error. The group
passed to ``size_kv_pool`` is usually one tensor-parallel group (each ``tp_rank`` once); it may also
span ``k`` replicas of it (each ``tp_rank`` ``k`` times, as the default ``group rank % tp_size`` gives).
A group of one process sizes one shard and may hold any ``tp_rank``.
"""
from __future__ import annotations

from typing import Sequence

from .. import errors


def _and(items: Sequence[object]) -> str:
    """``[0]`` -> "0", ``[0, 1]`` -> "0 and 1", ``[0, 1, 2]`` -> "0, 1 and 2"."""
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def check_tp_ranks(tp_ranks: Sequence[int], tp_size: int) -> None:
    """Raise ``InvalidArgumentError`` unless every ``tp_rank`` in ``[0, tp_size)`` is held equally often.

    Parameters
    ----------
    tp_ranks : sequence of int
        The ``tp_rank`` of each group rank, in group-rank order (each already in ``[0, tp_size)``).
    tp_size : int
        The tensor-parallel degree every rank agreed on.
    """
    size = len(tp_ranks)
    if size == 1:
        return
    hint = (
        "pass each rank its position in its tensor-parallel group as tp_rank=, or leave tp_rank out "
        "(group rank % tp_size)"
    )
    if size > tp_size and size % tp_size:
        raise errors.InvalidArgumentError(
            f"{size} ranks cannot hold each of the {tp_size} tp_ranks equally often (tp_ranks {list(tp_ranks)}, "
            f"tp_size={tp_size}): size over the tensor-parallel group (or whole replicas of it); {hint}"
        )
    replicas = max(1, size // tp_size)  # fewer ranks than shards: some tp_ranks are missing
    holders: dict[int, list[int]] = {t: [] for t in range(tp_size)}
    for r, t in enumerate(tp_ranks):
        holders[t].append(r)
    parts = [f"tp_rank {t} is held by ranks {_and(h)}" for t, h in holders.items() if len(h) > replicas]
    short = [t for t, h in holders.items() if len(h) < replicas]
    if short:
        parts.append(f"{'no rank holds' if replicas == 1 else 'too few ranks hold'} tp_rank {_and(short)}")
    if not parts:
        return
    each = "exactly one rank" if replicas == 1 else f"{replicas} ranks (one per replica)"
    raise errors.InvalidArgumentError(
        f"the ranks of the group (in group-rank order) hold tp_ranks {list(tp_ranks)} for tp_size={tp_size}: "
        f"{', '.join(parts)}; each tp_rank in [0, {tp_size}) must be held by {each}; {hint}"
    )
