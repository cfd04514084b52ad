"""The digest every rank exchanges before sizing: same model, same settings, or nobody starts.

Ranks of one tensor-parallel group that disagree on the model or the block size would build pools of
different shapes and corrupt each other's memory on the first collective. The settings that must
agree are hashed (sha256 of their canonical JSON) and exchanged with ``all_gather_object``; on a
mismatch every rank learns which ranks differ and on which fields. The caller brings each value to one
canonical form first (``prepare``), so equal settings written differently (``0`` / ``0.0``, "FP8" /
"fp8", numpy integers) hash alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence


def spec_dict(spec: Any) -> dict:
    """The JSON-able fields of a ``ModelSpec`` (its ``to_dict()`` when it has one)."""
    to_dict = getattr(spec, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return dataclasses.asdict(spec)


def settings(spec: Any, **fields: Any) -> dict:
    """The settings that must agree across ranks: the spec's fields under ``spec.`` plus ``fields``."""
    out = {f"spec.{k}": v for k, v in spec_dict(spec).items()}
    out.update(fields)
    # JSON round trip: tuples become lists, so the same settings compare equal on every rank
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def digest(values: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``values``."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_mismatch(per_rank: Sequence[Mapping[str, Any]], global_ranks: Sequence[int]) -> str | None:
    """``None`` when every rank's settings digest agrees with rank 0's, else a message naming who differs on what.

    Parameters
    ----------
    per_rank : sequence of dict
        Each rank's ``{"digest": str, "settings": dict}``, in group-rank order.
    global_ranks : sequence of int
        Global rank of each group rank, for the message.
    """
    ref = per_rank[0]
    odd = [r for r in range(1, len(per_rank)) if per_rank[r]["digest"] != ref["digest"]]
    if not odd:
        return None

    def name(r: int) -> str:
        return f"rank {r}" if global_ranks[r] == r else f"rank {r} (global rank {global_ranks[r]})"

    parts = []
    for r in odd:
        mine, theirs = ref["settings"], per_rank[r]["settings"]
        keys = sorted(set(mine) | set(theirs))
        diffs = [
            f"{k}: {_short(theirs.get(k, '<missing>'))} vs {_short(mine.get(k, '<missing>'))}"
            for k in keys
            if mine.get(k, "<missing>") != theirs.get(k, "<missing>")
        ]
        parts.append(f"{name(r)} differs from rank 0 on " + ", ".join(diffs or ["the digest only"]))
    agree = [name(r) for r in range(len(per_rank)) if r not in odd]
    return (
        f"the ranks of the group disagree on the model or the pool settings ({'; '.join(parts)}); "
        f"{', '.join(agree)} agree. Every rank of a tensor-parallel group must call size_kv_pool with the "
        "same model spec, block_size, kv_dtype, fp8_scales, tp_size, mem_fraction, headroom, "
        "max_batched_tokens and max_seqs"
    )
