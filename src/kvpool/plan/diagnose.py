"""Read per-GPU memory snapshots and name what the numbers show, with the fix.

Inputs:

- a JSON list of per-rank figures as torch reports them, in bytes unless the key says ``_mib`` / ``_gib``:
  ``{"rank": 0, "total": ..., "free": ..., "allocated": ..., "reserved": ..., "peak": ...}``
  (``total``/``free`` from ``torch.cuda.mem_get_info``, ``allocated``/``reserved`` from
  ``torch.cuda.memory_allocated``/``memory_reserved``, ``peak`` from ``max_memory_allocated``);
  a dict ``{"ranks": [...]}`` is accepted too;
- the CSV ``nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv`` prints.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from .hardware import GIB, MIB

FIELDS = ("total", "free", "allocated", "reserved", "peak", "used")


@dataclass
class Snapshot:
    rank: int
    total: int
    used: int
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "ok"
    title: str
    evidence: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


def _bytes(entry: dict, name: str, where: str) -> int | None:
    for suffix, scale in (("", 1), ("_bytes", 1), ("_mib", MIB), ("_gib", GIB)):
        key = name + suffix
        if key in entry and entry[key] is not None:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"{where}: {key!r} must be a finite non-negative number, got {value!r}")
            return int(value * scale)
    return None


def parse_snapshots(text: str, source: str = "input") -> list[Snapshot]:
    """Snapshots from JSON (list of per-rank dicts) or nvidia-smi CSV text."""
    stripped = text.strip()
    if not stripped:
        raise InvalidArgumentError(f"{source} is empty; give a JSON list of per-rank figures or nvidia-smi CSV")
    if stripped[0] in "[{":
        try:
            data = json.loads(stripped)
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
        return _unique_ranks(out, source)
    return _unique_ranks(_parse_csv(stripped, source), source)


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
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{where}: 'rank' must be an integer >= 0, got {value!r}")
    return value


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
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"{where}: {cell.strip()!r} is not a finite non-negative number of MiB")
    return int(value * MIB)


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


def _g(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def diagnose(snapshots: list[Snapshot], plan=None) -> list[Finding]:
    """Findings for ``snapshots`` (one per rank); ``plan`` (a MemoryPlan) adds the above-plan check."""
    findings: list[Finding] = []
    used = [s.used for s in snapshots]
    median = statistics.median(used)
    total = snapshots[0].total
    heavy = max(snapshots, key=lambda s: s.used)
    if len(snapshots) > 1 and heavy.used - median > max(1 * GIB, 0.02 * total):
        extra = heavy.used - median
        contexts = extra / (0.5 * GIB)
        cause = ("rank 0 often holds extra CUDA contexts when other ranks touch cuda:0 before "
                 f"torch.cuda.set_device (~0.5 GiB each: about {contexts:.0f} here), the sampler's logits, or "
                 "buffers created only on the driver rank") if heavy.rank == 0 else \
            "that rank allocated more KV blocks than its peers or keeps extra activations"
        findings.append(Finding(
            "warning", f"rank {heavy.rank} is much heavier than the others",
            f"rank {heavy.rank} uses {_g(heavy.used)}, the median rank {_g(median)} (+{_g(extra)})",
            f"{cause}; call torch.cuda.set_device(local_rank) before any CUDA work, and size the pool with the MIN "
            "over the TP group (kvpool.runtime.size_kv_pool does) so every rank holds the same blocks",
        ))
    for s in snapshots:
        if s.allocated is not None and s.reserved is not None:
            gap = s.reserved - s.allocated
            if gap > max(2 * GIB, 0.1 * s.reserved):
                findings.append(Finding(
                    "warning", f"rank {s.rank}: reserved far above allocated (fragmentation)",
                    f"reserved {_g(s.reserved)}, allocated {_g(s.allocated)}: {_g(gap)} cached but unused",
                    "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, and call torch.cuda.empty_cache() after "
                    "the profile run, before allocating the KV pool",
                ))
            non_torch = s.used - s.reserved
            limit = (plan.per_gpu["comm_gib"] + plan.per_gpu["overhead_gib"]) * GIB if plan else 2 * GIB
            if non_torch > limit + 0.25 * GIB:
                findings.append(Finding(
                    "warning", f"rank {s.rank}: memory outside torch's allocator is high",
                    f"used {_g(s.used)} - reserved {_g(s.reserved)} = {_g(non_torch)} non-torch memory"
                    + (f" vs {_g(limit)} planned for comm + overhead" if plan else " (more than 2 GiB)"),
                    "this is NCCL buffers (NCCL_BUFFSIZE, channels, NVLS) and CUDA graphs: lower NCCL_BUFFSIZE, set "
                    "NCCL_NVLS_ENABLE=0, capture fewer graph sizes (or --enforce-eager), or plan with "
                    "`kvpool plan --comm-gib` set to the measured figure",
                ))
        if s.peak is not None and s.allocated is not None and s.peak > s.allocated + max(1 * GIB, 0.1 * s.allocated):
            findings.append(Finding(
                "warning", f"rank {s.rank}: transient peak well above steady allocation",
                f"peak {_g(s.peak)} vs allocated now {_g(s.allocated)} (+{_g(s.peak - s.allocated)})",
                "a large prefill step or sampler batch spikes memory: lower --max-num-batched-tokens / --max-num-seqs "
                "or keep that much free (the planner's activation term)",
            ))
        free = s.total - s.used
        if free < max(0.5 * GIB, 0.01 * s.total):
            findings.append(Finding(
                "error", f"rank {s.rank}: almost no free memory",
                f"{_g(free)} free of {_g(s.total)}",
                "any allocation outside the pool (CUDA graphs, a longer prefill, NCCL growing) will OOM: lower "
                "--gpu-memory-utilization by 0.02-0.05 or reserve more headroom",
            ))
    if plan is not None:
        budget = plan.per_gpu["budget_gib"] * GIB
        for s in snapshots:
            if s.used > budget + 0.5 * GIB:
                findings.append(Finding(
                    "warning", f"rank {s.rank}: memory above plan",
                    f"uses {_g(s.used)}, the plan's budget is {_g(budget)} (+{_g(s.used - budget)})",
                    "the difference is usually communication buffers or CUDA graphs the plan did not count: measure "
                    "them and pass --comm-gib / --overhead-gib, or lower --mem-fraction",
                ))
    if not findings:
        findings.append(Finding("ok", "no problem found",
                                f"{len(snapshots)} rank(s), used {_g(min(used))} to {_g(max(used))} of {_g(total)}",
                                "nothing to change"))
    return findings


def diagnose_file(path, plan=None) -> tuple[list[Snapshot], list[Finding]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc.strerror}") from None
    snaps = parse_snapshots(text, source=str(path))
    return snaps, diagnose(snaps, plan)
