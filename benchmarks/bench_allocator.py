"""Benchmark of the C++ block allocator against its pure-Python reference (same run, ratio printed).

Run: ``python -m pytest benchmarks/bench_allocator.py`` (about a minute). Each case is measured for
``kvpool`` (the C++ core through its Python API) and for ``reference``
(kvpool._reference, plain Python containers); a table at the end gives both medians, the ratio, and
the vLLM 0.33.0 BlockPool figures quoted in issue 2 (measured on the same kind of 2-core machine,
not re-measured here) with the issue's targets.

The "cold" cases (issue 10) run on a 200,000-block pool whose free list was scattered first (every
block allocated, then freed in a random permutation), so consecutive free-list blocks lie far apart in
memory and each alloc+free walks blocks last touched a whole lap of the list ago. They time kvpool and
vLLM 0.33.0's real ``BlockPool`` (``get_new_blocks`` + ``free_blocks``) side by side in the same run;
vLLM's source comes from ``.peers/vllm_src`` through ``../shared/peers/vllm_v1_step.py`` (never
committed) and its side is skipped, with the reason, when either is absent. vLLM puts freed blocks that
have no hash at the head of its queue (LIFO), so after the first call it reuses the same warm blocks:
its side of the ratio is not cold, which makes the ratio conservative.
"""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from kvpool import BlockAllocator, hash_block_tokens
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference import hash_block_tokens as reference_hash

IMPLS = {"kvpool": (BlockAllocator, hash_block_tokens), "reference": (ReferenceBlockAllocator, reference_hash)}

# issue 2 orientation: vLLM 0.33.0 BlockPool on this 2-core machine -> (rate, unit, kvpool target)
VLLM = {
    "alloc+free 1 (caching)": (0.5e6, None),
    "alloc+free 16 (caching)": (1.8e6, 10),
    "alloc+free 1024 (caching)": (2.2e6, 50),
    "build 1M blocks": (1 / 1.3, None),
    "hash 16-token blocks": (16 / 1.6e-6, None),
}
ABSOLUTE_TARGETS = {"build 1M blocks": ("< 20 ms", lambda s: s < 0.020),
                    "hash 16-token blocks": (">= 100 M tokens/s", lambda rate: rate >= 100e6)}

# issue 10: cold-memory alloc+free on a 200,000-block pool, vLLM's BlockPool measured in the same run
COLD_POOL_BLOCKS = 200_000
COLD_TARGETS = {16: 15, 1024: 50}  # n -> speed-up over vLLM asked by issue 10
ROOT = Path(__file__).resolve().parent.parent

_results = {}  # case -> {"units": n, "unit": str, impl: median seconds}


def _record(benchmark, case, impl, units, unit):
    row = _results.setdefault(case, {"units": units, "unit": unit})
    median = benchmark.stats.stats.median
    row[impl] = median
    benchmark.extra_info.update(case=case, units=units, unit=unit, rate_per_s=units / median)


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or not _results:
        return
    with capture.global_and_fixture_disabled():  # print past pytest's output capture
        _print_summary(reporter.write_line)


def _print_summary(write):
    write("")
    write("kvpool allocator vs pure-Python reference (medians); vLLM: measured in this run for the "
          f"'cold' cases ({COLD_POOL_BLOCKS:,}-block pool, scattered free list), else figures from issue 2")
    write(f"{'case':28} {'kvpool':>10} {'rate':>16} {'reference':>10} {'x ref':>7} {'vLLM rate':>12} {'x vLLM':>7}  target")
    for case, row in _results.items():
        ours, ref = row.get("kvpool"), row.get("reference")
        if ours is None:
            continue
        rate = row["units"] / ours
        line = f"{case:28} {ours * 1e6:8.2f}us {rate / 1e6:9.2f} M{row['unit']}/s"
        line += f" {ref * 1e6:8.1f}us {ref / ours:7.1f}" if ref else f" {'-':>10} {'-':>7}"
        vllm, factor = VLLM.get(case, (None, None))
        if row.get("vllm"):  # measured in this run: rate from the median
            vllm, factor = row["units"] / row["vllm"], row.get("target")
        if vllm:
            shown_rate = 1 / ours if case.startswith("build") else rate
            line += f" {vllm / 1e6:8.2f} M/s {shown_rate / vllm:7.1f}" if not case.startswith("build") \
                else f" {1 / vllm:9.2f} s  {shown_rate / vllm:7.1f}"
        else:
            line += f" {'-':>12} {'-':>7}"
        if factor:
            line += f"  >= {factor}x vLLM: {'MET' if rate / vllm >= factor else 'NOT MET'}"
        if case in ABSOLUTE_TARGETS:
            text, ok = ABSOLUTE_TARGETS[case]
            line += f"  {text}: {'MET' if ok(ours if case.startswith('build') else rate) else 'NOT MET'}"
        write(line)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no-caching"])
@pytest.mark.parametrize("n", [1, 16, 128, 1024])
def test_alloc_free(benchmark, impl, caching, n):
    """allocate(n) then free() of the same ids: the per-step cost of a scheduler."""
    alloc = IMPLS[impl][0](4096, block_size=16, enable_prefix_caching=caching)
    benchmark.group = f"alloc+free {n}"

    def pair():
        alloc.free(alloc.allocate(n))

    benchmark(pair)
    _record(benchmark, f"alloc+free {n} ({'caching' if caching else 'no caching'})", impl, n, "blocks")
    assert alloc.num_free_blocks == 4096


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [16, 1024])
def test_alloc_cache_free_churn(benchmark, impl, n):
    """allocate, cache_blocks and free n blocks in a pool of n: every allocation evicts a cached block."""
    cls, hasher = IMPLS[impl]
    alloc = cls(n, block_size=16)
    hashes = hash_block_tokens(np.arange(16 * n, dtype=np.int32), 16)
    benchmark.group = f"alloc+cache+free {n}"

    def lifecycle():
        ids = alloc.allocate(n)
        alloc.cache_blocks(ids, hashes)
        alloc.free(ids)

    benchmark(lifecycle)
    _record(benchmark, f"alloc+cache+free {n}", impl, n, "blocks")
    assert alloc.stats()["evictions"] > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [16, 256])
def test_match_prefix_hits(benchmark, impl, n):
    """match_prefix() of an n-block cached prompt (all hits, free blocks revived) then free()."""
    cls, _ = IMPLS[impl]
    alloc = cls(4096, block_size=16)
    hashes = hash_block_tokens(np.arange(16 * n, dtype=np.int32), 16)
    ids = alloc.allocate(n)
    alloc.cache_blocks(ids, hashes)
    alloc.free(ids)
    benchmark.group = f"match_prefix {n}"

    def hit_then_free():
        alloc.free(alloc.match_prefix(hashes))

    benchmark(hit_then_free)
    _record(benchmark, f"match_prefix+free {n} hits", impl, n, "blocks")
    assert alloc.stats()["prefix_hit_blocks"] >= n


@pytest.mark.parametrize("impl", IMPLS)
def test_hash_block_tokens(benchmark, impl):
    """hash_block_tokens() of 65,536 tokens (4,096 blocks of 16)."""
    tokens = np.random.default_rng(0).integers(0, 150_000, size=65_536, dtype=np.int32)
    benchmark.group = "hash_block_tokens"
    hashes = benchmark(IMPLS[impl][1], tokens, 16)
    _record(benchmark, "hash 16-token blocks", impl, tokens.size, "tokens")
    assert hashes.shape == (4096,)


@pytest.mark.parametrize("impl", IMPLS)
def test_build_1m_blocks(benchmark, impl):
    """Constructing an allocator of 1,000,000 blocks."""
    benchmark.group = "build 1M blocks"
    alloc = benchmark.pedantic(IMPLS[impl][0], args=(1_000_000,), rounds=5 if impl == "kvpool" else 2,
                               warmup_rounds=1)
    _record(benchmark, "build 1M blocks", impl, 1_000_000, "blocks")
    assert alloc.num_free_blocks == 1_000_000


def _vllm_block_pool():
    """vLLM 0.33.0's BlockPool class, or None and the reason it is unavailable."""
    src = Path(os.environ.get("KVPOOL_PEERS_DIR", ROOT / ".peers")) / "vllm_src"
    if not (src / "vllm/v1/core/block_pool.py").exists():
        return None, f"vLLM side skipped: {src} holds no vLLM source (run ../shared/peers/vllm_v1_step.py fetch)"
    loaders = (ROOT / ".peers" / "vllm_v1_step.py", ROOT.parent / "shared" / "peers" / "vllm_v1_step.py")
    loader = next((p for p in loaders if p.exists()), None)
    if loader is None:
        return None, f"vLLM side skipped: no vllm_v1_step.py in {' or '.join(map(str, loaders))}"
    os.environ.setdefault("VLLM_SRC", str(src))  # read when the loader is imported
    try:
        spec = importlib.util.spec_from_file_location("vllm_v1_step", loader)
        peer = importlib.util.module_from_spec(spec)
        sys.modules["vllm_v1_step"] = peer
        spec.loader.exec_module(peer)
        peer.install()  # stubs every vllm module BlockPool does not need
        from vllm.v1.core.block_pool import BlockPool
    except Exception as e:  # a broken peer must not stop kvpool's own figures
        return None, f"vLLM side failed to load: {type(e).__name__}: {e}"
    return BlockPool, None


def _scattered(impl, seed=0):
    """A 200,000-block pool of `impl` whose free list is in random order; returns (pool, alloc_free)."""
    order = np.random.default_rng(seed).permutation
    if impl == "kvpool":
        alloc = BlockAllocator(COLD_POOL_BLOCKS, block_size=16)
        alloc.free(order(alloc.allocate(COLD_POOL_BLOCKS)))
        return alloc, lambda n: alloc.free(alloc.allocate(n))
    block_pool, reason = _vllm_block_pool()
    if block_pool is None:
        pytest.skip(reason)
    pool = block_pool(COLD_POOL_BLOCKS, enable_caching=True, hash_block_size=16)
    blocks = pool.get_new_blocks(pool.get_num_free_blocks())  # block 0 is vLLM's null block, never free
    pool.free_blocks([blocks[i] for i in order(len(blocks))])

    def alloc_free(n):
        pool.free_blocks(reversed(pool.get_new_blocks(n)))  # reversed: as KVCacheManager frees a request
    return pool, alloc_free


@pytest.mark.parametrize("impl", ["kvpool", "vllm"])
@pytest.mark.parametrize("n", sorted(COLD_TARGETS))
def test_alloc_free_cold(benchmark, impl, n):
    """allocate(n) + free() on a 200,000-block pool whose LRU order walks cold, scattered memory."""
    pool, alloc_free = _scattered(impl)
    benchmark.group = f"alloc+free {n} cold"
    # Several calls per timed round, so the timer's own cost (~0.1 us) does not weigh on 0.5 us calls.
    iterations, rounds = (50, 1000) if n == 16 else (5, 400)
    benchmark.pedantic(alloc_free, args=(n,), iterations=iterations, rounds=rounds, warmup_rounds=20)
    case = f"alloc+free {n} cold"
    _record(benchmark, case, impl, n, "blocks")
    _results[case]["target"] = COLD_TARGETS[n]
    free = pool.num_free_blocks if impl == "kvpool" else pool.get_num_free_blocks()
    assert free == COLD_POOL_BLOCKS - (impl == "vllm")
