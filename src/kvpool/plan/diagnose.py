"""Read per-GPU memory snapshots and name what the numbers show, with the fix.

Each finding comes from one small rule below, with its thresholds named and the reason for each; a rule
that compares with a plan (``kvpool diagnose --model``) reads the plan's bytes. The snapshots themselves
(torch's JSON figures or ``nvidia-smi``'s CSV) are read by `kvpool.plan.snapshots`.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from .snapshots import Snapshot, parse_snapshots
from .units import GIB, gib_text

# A rank is "much heavier" when it uses more than the median rank by both: 1 GiB (two stray CUDA
# contexts; below that the spread is allocator slack) and 2% of the card (on a 180 GiB card 1 GiB is noise).
HEAVY_RANK_BYTES, HEAVY_RANK_SHARE = 1 * GIB, 0.02
# One CUDA context created on cuda:0 by another rank (context + lazily loaded kernels) costs about 0.5 GiB.
STRAY_CONTEXT_BYTES = GIB // 2
# Reserved above allocated by 2 GiB and 10% of reserved is fragmentation: the caching allocator's own
# slack (rounding blocks, one free segment per stream) stays well under both.
FRAGMENTATION_BYTES, FRAGMENTATION_SHARE = 2 * GIB, 0.10
# Without a plan to compare with, non-torch memory (NCCL buffers, CUDA context, graphs) rarely passes 2 GiB.
NON_TORCH_BYTES = 2 * GIB
# Slack over the plan's comm + overhead: its CUDA-context figure is an estimate on most cards.
NON_TORCH_SLACK_BYTES = GIB // 4
# A peak above the steady allocation by 1 GiB and 10% of it is a transient (a prefill step, the
# sampler) that the pool must leave room for, not allocator noise.
PEAK_BYTES, PEAK_SHARE = 1 * GIB, 0.10
# Under 0.5 GiB (or 1% of the card) free, the next allocation outside the pool (a graph capture, a
# longer prefill, NCCL growing) runs out of memory.
FREE_BYTES, FREE_SHARE = GIB // 2, 0.01
# Used above the plan's budget by more than 0.5 GiB: more than the caching allocator's rounding and the small
# buffers no plan counts (library handles, scratch tensors) add.
ABOVE_PLAN_BYTES = GIB // 2


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "ok"
    title: str
    evidence: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


def heavy_rank(snaps: list[Snapshot], plan) -> list[Finding]:
    """One rank far above the median: stray CUDA contexts on rank 0, or uneven KV pools."""
    median = statistics.median(s.used for s in snaps)
    heavy = max(snaps, key=lambda s: s.used)
    extra = heavy.used - median
    if len(snaps) < 2 or extra <= max(HEAVY_RANK_BYTES, HEAVY_RANK_SHARE * snaps[0].total):
        return []
    if heavy.rank == 0:
        cause = ("rank 0 often holds extra CUDA contexts when other ranks touch cuda:0 before "
                 f"torch.cuda.set_device (~0.5 GiB each: about {extra / STRAY_CONTEXT_BYTES:.0f} here), the "
                 "sampler's logits, or buffers created only on the driver rank")
    else:
        cause = "that rank allocated more KV blocks than its peers or keeps extra activations"
    return [Finding(
        "warning", f"rank {heavy.rank} is much heavier than the others",
        f"rank {heavy.rank} uses {gib_text(heavy.used)}, the median rank {gib_text(median)} (+{gib_text(extra)})",
        f"{cause}; call torch.cuda.set_device(local_rank) before any CUDA work, and size the pool with the MIN "
        "over the TP group (kvpool.runtime.size_kv_pool does) so every rank holds the same blocks")]


def _on_rank(s: Snapshot, severity: str, title: str, evidence: str, fix: str) -> Finding:
    return Finding(severity, f"rank {s.rank}: {title}", evidence, fix)


def fragmentation(s: Snapshot, plan) -> Finding | None:
    """Reserved far above allocated: cached segments torch cannot reuse."""
    gap = None if s.allocated is None or s.reserved is None else s.reserved - s.allocated
    if gap is not None and gap > max(FRAGMENTATION_BYTES, FRAGMENTATION_SHARE * s.reserved):
        return _on_rank(s, "warning", "reserved far above allocated (fragmentation)",
                        f"reserved {gib_text(s.reserved)}, allocated {gib_text(s.allocated)}: {gib_text(gap)} "
                        "cached but unused", "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, and call "
                        "torch.cuda.empty_cache() after the profile run, before allocating the KV pool")
    return None


def non_torch_memory(s: Snapshot, plan) -> Finding | None:
    """Memory outside torch's allocator above the plan's comm + overhead + what exists before vLLM's snapshot
    (CUDA context, communicator set-up), or 2 GiB without a plan."""
    non_torch = None if s.allocated is None or s.reserved is None else s.used - s.reserved
    limit = NON_TORCH_BYTES
    if plan:
        limit = plan.term("comm").bytes + plan.term("overhead").bytes + (
            plan.before_snapshot.bytes if plan.before_snapshot is not None else 0)
    if non_torch is not None and non_torch > limit + NON_TORCH_SLACK_BYTES:
        return _on_rank(s, "warning", "memory outside torch's allocator is high",
                        f"used {gib_text(s.used)} - reserved {gib_text(s.reserved)} = {gib_text(non_torch)} non-torch "
                        "memory" + (f" vs {gib_text(limit)} planned for comm + overhead" if plan else " (more than 2 GiB)"),
                        "this is NCCL buffers (NCCL_BUFFSIZE, channels, NVLS) and CUDA graphs: lower NCCL_BUFFSIZE, "
                        "set NCCL_NVLS_ENABLE=0, capture fewer graph sizes (or --enforce-eager), or plan with "
                        "`kvpool plan --comm-gib` set to the measured figure")
    return None


def transient_peak(s: Snapshot, plan) -> Finding | None:
    """A peak well above the steady allocation: a prefill step or the sampler spiking."""
    if s.peak is not None and s.allocated is not None and s.peak > s.allocated + max(PEAK_BYTES,
                                                                                      PEAK_SHARE * s.allocated):
        return _on_rank(s, "warning", "transient peak well above steady allocation",
                        f"peak {gib_text(s.peak)} vs allocated now {gib_text(s.allocated)} "
                        f"(+{gib_text(s.peak - s.allocated)})", "a large prefill step or sampler batch spikes memory: "
                        "lower --max-num-batched-tokens / --max-num-seqs or keep that much free (the planner's "
                        "activation term)")
    return None


def no_free_memory(s: Snapshot, plan) -> Finding | None:
    """Almost nothing free: the next allocation outside the pool fails."""
    free = s.total - s.used
    if free < max(FREE_BYTES, FREE_SHARE * s.total):
        return _on_rank(s, "error", "almost no free memory", f"{gib_text(free)} free of {gib_text(s.total)}",
                        "any allocation outside the pool (CUDA graphs, a longer prefill, NCCL growing) will OOM: "
                        "lower --gpu-memory-utilization by 0.02-0.05 or reserve more headroom")
    return None


def above_plan(s: Snapshot, plan) -> Finding | None:
    """A rank using more than the plan's budget: terms the plan did not count."""
    if plan is not None and s.used > plan.budget_bytes + ABOVE_PLAN_BYTES:
        return _on_rank(s, "warning", "memory above plan", f"uses {gib_text(s.used)}, the plan's budget is "
                        f"{gib_text(plan.budget_bytes)} (+{gib_text(s.used - plan.budget_bytes)})",
                        "the difference is usually communication buffers or CUDA graphs the plan did not count: "
                        "measure them and pass --comm-gib / --overhead-gib, or lower --mem-fraction")
    return None


def each_rank(*rules):
    """A rule over all snapshots from per-rank rules: rank by rank, each rule in turn."""
    def rule(snaps: list[Snapshot], plan) -> list[Finding]:
        return [f for s in snaps for r in rules if (f := r(s, plan)) is not None]
    return rule


#: The rules in the order their findings are listed.
RULES = (heavy_rank, each_rank(fragmentation, non_torch_memory, transient_peak, no_free_memory), each_rank(above_plan))


def diagnose(snapshots: list[Snapshot], plan=None) -> list[Finding]:
    """Findings for ``snapshots`` (one per rank); ``plan`` (a MemoryPlan) adds the checks against it."""
    findings = [f for rule in RULES for f in rule(snapshots, plan)]
    if not findings:
        used = [s.used for s in snapshots]
        findings.append(Finding("ok", "no problem found", f"{len(snapshots)} rank(s), used {gib_text(min(used))} to "
                                f"{gib_text(max(used))} of {gib_text(snapshots[0].total)}", "nothing to change"))
    return findings


def diagnose_file(path, plan=None) -> tuple[list[Snapshot], list[Finding]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc.strerror}") from None
    snaps = parse_snapshots(text, source=str(path))
    return snaps, diagnose(snaps, plan)


__all__ = ["Finding", "diagnose", "diagnose_file", "parse_snapshots", "Snapshot", "RULES"]
