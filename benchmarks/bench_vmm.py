"""The VMM layer's own costs (issue 16 targets): grow by 1 GiB, wake of a large pool, memory given back.

Run: ``python -m pytest benchmarks/bench_vmm.py -q -s`` (on a GPU: the CUDA backend; without one: the host
backend, small sizes, a smoke of the same code, not figures). Every figure is a median of wall-clock
rounds (map/unmap are host calls that return when the mapping exists) and is printed with its target and
with a baseline measured in the same run: ``torch.empty`` of the same bytes on an empty caching allocator
(one ``cudaMalloc``). Chunks of 2 MiB (the device granularity) and of 32 MiB (``chunk_bytes``: 16 times
fewer driver calls) are both timed; ``prepared`` maps chunks created ahead by ``prepare()``.
"""
import statistics
import time

import pytest
import torch

from kvpool import _C

CUDA = torch.cuda.is_available()
BACKEND = "cuda" if CUDA else "host"
GiB, MiB = 1 << 30, 1 << 20
GROW_BYTES = GiB if CUDA else 64 * MiB
ROUNDS = 5


def _median_s(setup, target, rounds=ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        setup()
        start = time.perf_counter()
        target()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if CUDA else 0


def _cudamalloc_s(nbytes: int) -> float:
    """Baseline: one torch.empty of nbytes on an empty caching allocator (a cudaMalloc)."""
    if not CUDA:
        return float("nan")
    held = []

    def setup():
        held.clear()
        torch.cuda.empty_cache()

    def target():
        held.append(torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()
    seconds = _median_s(setup, target)
    held.clear()
    torch.cuda.empty_cache()
    return seconds


def _report(what: str, seconds: float, target_s: float | None, baseline_s: float) -> None:
    verdict = "" if target_s is None else ("  target met" if seconds <= target_s else "  TARGET MISSED")
    ratio = f"  ({seconds / baseline_s:.2f}x the cudaMalloc baseline)" if baseline_s == baseline_s else ""
    goal = "" if target_s is None else f" (target <= {target_s * 1e3:.0f} ms)"
    print(f"\n[{BACKEND}] {what}: {seconds * 1e3:.3f} ms{goal}{verdict}{ratio}")


@pytest.mark.parametrize("chunk_mib", [0, 32], ids=["2MiB-chunks", "32MiB-chunks"])
@pytest.mark.parametrize("prepared", [False, True], ids=["fresh", "prepared"])
def test_grow_by_one_gib(chunk_mib, prepared):
    r = _C.VirtualRange(2 * GROW_BYTES, backend=BACKEND, chunk_bytes=chunk_mib * MiB)

    def setup():
        if r.mapped_bytes:
            r.unmap(0, GROW_BYTES)
        if prepared:
            r.prepare(GROW_BYTES)
    seconds = _median_s(setup, lambda: r.map(0, GROW_BYTES))
    assert r.mapped_bytes == GROW_BYTES
    _report(f"grow by {GROW_BYTES // MiB} MiB, chunk {r.granularity // MiB} MiB, {'prepared' if prepared else 'fresh'}",
            seconds, 0.010 * GROW_BYTES / GiB if CUDA else None, _cudamalloc_s(GROW_BYTES))


@pytest.mark.parametrize("chunk_mib", [0, 32], ids=["2MiB-chunks", "32MiB-chunks"])
def test_sleep_gives_memory_back_and_wake_maps_it_again(chunk_mib):
    pool = min(40 * GiB, int(_free_bytes() * 0.6)) // (32 * MiB) * (32 * MiB) if CUDA else 256 * MiB
    r = _C.VirtualRange(pool, backend=BACKEND, chunk_bytes=chunk_mib * MiB)
    r.map(0, r.reserved_bytes)
    awake = _free_bytes()
    seconds_sleep = _median_s(lambda: r.remap_all() if r.asleep else None, r.release_all, rounds=3)
    if CUDA:  # asleep now: the pool's memory is free for others
        assert _free_bytes() - awake >= 0.95 * r.reserved_bytes, (awake, _free_bytes(), r.reserved_bytes)
    seconds_wake = _median_s(lambda: None if r.asleep else r.release_all(), r.remap_all, rounds=3)
    assert r.mapped_bytes == r.reserved_bytes
    scale = 40 * GiB / r.reserved_bytes
    _report(f"sleep of {r.reserved_bytes / GiB:.1f} GiB, chunk {r.granularity // MiB} MiB", seconds_sleep, None,
            float("nan"))
    _report(f"wake of {r.reserved_bytes / GiB:.1f} GiB, chunk {r.granularity // MiB} MiB (x{scale:.2f} for 40 GiB: "
            f"{seconds_wake * scale * 1e3:.0f} ms)", seconds_wake, 0.200 / scale if CUDA else None, float("nan"))
