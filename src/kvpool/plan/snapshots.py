"""Per-GPU memory snapshots, read from torch's figures (JSON) or ``nvidia-smi``'s CSV, checked for sense.

Inputs:

- a JSON list of per-rank figures as torch reports them, in bytes unless the key says ``_mib`` / ``_gib``:
  ``{"rank": 0, "total": ..., "free": ..., "allocated": ..., "reserved": ..., "peak": ...}``
  (``total``/``free`` from ``torch.cuda.mem_get_info``, ``allocated``/``reserved`` from
  ``torch.cuda.memory_allocated``/``memory_reserved``, ``peak`` from ``max_memory_allocated``);
  a dict ``{"ranks": [...]}`` is accepted too;
- the CSV ``nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv`` prints.

Impossible figures (free above total, a zero total, NaN, a rank twice) are refused with the entry named.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .checks import check_int, check_number
from .units import GIB, MIB

@dataclass
class Snapshot:
    """One GPU's memory, in bytes: ``used`` of ``total``, and torch's own figures where given."""

    rank: int
    total: int
    used: int
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None


def _bytes(entry: dict, name: str, where: str) -> int | None:
    """The figure ``name`` of ``entry`` in bytes, whichever unit its key says (``total``, ``total_gib``, ...)."""
    for suffix, scale in (("", 1), ("_bytes", 1), ("_mib", MIB), ("_gib", GIB)):
        key = name + suffix
        if key in entry and entry[key] is not None:
            return int(check_number(f"{where}: {key!r}", entry[key]) * scale)
    return None


def parse_snapshots(text: str, source: str = "input") -> list[Snapshot]:
    """Snapshots from JSON (list of per-rank dicts) or nvidia-smi CSV text."""
    stripped = text.strip()
    if not stripped:
        raise InvalidArgumentError(f"{source} is empty; give a JSON list of per-rank figures or nvidia-smi CSV")
    if stripped[0] in "[{":
        return _unique_ranks(_parse_json(stripped, source), source)
    return _unique_ranks(_parse_csv(stripped, source), source)


def _parse_json(text: str, source: str) -> list[Snapshot]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{source} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict):
        data = data.get("ranks")
    if not isinstance(data, list) or not data:
        raise InvalidArgumentError(f"{source}: expected a non-empty JSON list of per-rank objects")
    out = []
    for i, entry in enumerate(data):
        where = f"{source} entry {i}"
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"{where} must be an object, got {entry!r:.60}")
        total = _bytes(entry, "total", where)
        free, used = _bytes(entry, "free", where), _bytes(entry, "used", where)
        if total is None or (free is None and used is None):
            raise InvalidArgumentError(f"{where} needs 'total' and 'free' (or 'used'), as torch.cuda.mem_get_info gives")
        _check_total(total, used, free, where)
        used = used if used is not None else total - free
        out.append(Snapshot(_rank(entry.get("rank", i), where), total, used, _bytes(entry, "allocated", where),
                            _bytes(entry, "reserved", where), _bytes(entry, "peak", where)))
    return out


def _check_total(total: int, used: int | None, free: int | None, where: str) -> None:
    """A GPU's figures must be possible: total > 0, used and free each within total."""
    if total <= 0:
        raise InvalidArgumentError(f"{where}: 'total' must be above 0 bytes, got {total}; give the GPU's memory "
                                   "as torch.cuda.mem_get_info()[1] reports it")
    if free is not None and free > total:
        raise InvalidArgumentError(f"{where}: free {free} is above total {total}; the two figures belong together "
                                   "(free, total = torch.cuda.mem_get_info())")
    if used is not None and used > total:
        raise InvalidArgumentError(f"{where}: used {used} is above total {total}")


def _rank(value, where: str) -> int:
    return check_int(f"{where}: 'rank'", value, minimum=0)


def _unique_ranks(snaps: list[Snapshot], source: str) -> list[Snapshot]:
    seen: set[int] = set()
    for s in snaps:
        if s.rank in seen:
            raise InvalidArgumentError(f"{source}: rank {s.rank} appears twice; give one snapshot per rank")
        seen.add(s.rank)
    return snaps


def _mib(cell: str, where: str) -> int:
    text = cell.strip().replace("MiB", "").strip()
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(f"{where}: cannot read {cell!r} as MiB") from None
    return int(check_number(f"{where}: {cell.strip()!r}", value, unit="MiB") * MIB)


def _parse_csv(text: str, source: str) -> list[Snapshot]:
    rows = list(csv.reader(io.StringIO(text)))
    header = [h.strip().lower() for h in rows[0]]
    try:
        i_idx = next(i for i, h in enumerate(header) if h.startswith("index"))
        i_used = next(i for i, h in enumerate(header) if h.startswith("memory.used"))
        i_total = next(i for i, h in enumerate(header) if h.startswith("memory.total"))
    except StopIteration:
        raise InvalidArgumentError(
            f"{source}: CSV header must hold index, memory.used, memory.total "
            "(nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv)"
        ) from None
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{source} line {n}"
        if len(row) <= max(i_idx, i_used, i_total):
            raise InvalidArgumentError(f"{where}: expected {len(header)} columns, got {len(row)}")
        try:
            index = int(row[i_idx].strip())
        except ValueError:
            raise InvalidArgumentError(f"{where}: the GPU index {row[i_idx].strip()!r} is not an integer") from None
        total, used = _mib(row[i_total], where), _mib(row[i_used], where)
        _check_total(total, used, None, where)
        out.append(Snapshot(_rank(index, where), total, used))
    if not out:
        raise InvalidArgumentError(f"{source}: the CSV has a header but no GPU rows")
    return out


__all__ = ["Snapshot", "parse_snapshots"]
