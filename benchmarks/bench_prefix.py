"""What prefix-cache integrity costs: verified admission vs hash-only, keyed hashing vs unkeyed (one run).

Run: ``python -m pytest benchmarks/bench_prefix.py`` (about 20 s). Admission is issue 10's case: a
2,000-token prompt whose first 1,024 tokens are cached, hashed, matched and given fresh blocks, then
freed again. ``hash_only`` is the path kvpool took before issue 17 (``match_prefix`` then
``allocate``, the hit trusted); ``verified`` is what ``BlockTables.add`` does now
(``allocate_with_prefix``: every hit's tokens, salt and prefix compared, all or nothing). The table
at the end prints both medians and the slowdown (issue 17's target: <= 5%) and the hash rates
(target: >= 1 G tokens/s keyed).
"""
import numpy as np
import pytest

from kvpool import BlockAllocator, hash_block_tokens

BS, PROMPT, CACHED = 16, 2000, 1024
KEY = 0x0123456789ABCDEF_FEDCBA9876543210
_medians = {}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or not _medians:
        return
    with capture.global_and_fixture_disabled():
        write = reporter.write_line
        write("")
        write("prefix-cache integrity: medians of this run")
        for case, value in _medians.items():
            write(f"  {case:34} {value * 1e6:9.2f} us")
        if {"admission hash_only", "admission verified"} <= _medians.keys():
            slow = _medians["admission verified"] / _medians["admission hash_only"] - 1
            write(f"  verification slows admission by {100 * slow:+.1f}% (target <= +5%)")
        for keyed in ("unkeyed", "keyed"):
            if f"hash 65,536 tokens {keyed}" in _medians:
                rate = 65_536 / _medians[f"hash 65,536 tokens {keyed}"]
                write(f"  hash_block_tokens {keyed}: {rate / 1e9:.2f} G tokens/s (target >= 1 G keyed)")


def _prompt():
    return np.random.default_rng(0).integers(0, 150_000, size=PROMPT, dtype=np.int32)


@pytest.mark.parametrize("path", ["hash_only", "verified"])
def test_admission(benchmark, path):
    """Admit a 2,000-token prompt with 1,024 tokens cached, then free it (the pool is unchanged)."""
    alloc = BlockAllocator(4096, BS, hash_key=KEY)
    tokens = _prompt()
    blocks = -(-PROMPT // BS)
    matchable = (PROMPT - 1) // BS
    cached_blocks = CACHED // BS
    hashes = alloc.hash_tokens(tokens)
    first = alloc.allocate(cached_blocks)
    if path == "verified":
        alloc.cache_blocks_verified(first, hashes[:cached_blocks], tokens[:CACHED])
    else:
        alloc.cache_blocks(first, hashes[:cached_blocks])
    alloc.free(first)

    def admit_hash_only():
        h = alloc.hash_tokens(tokens)
        hit = alloc.match_prefix(h[:matchable])
        fresh = alloc.allocate(blocks - len(hit))
        alloc.free(np.concatenate([hit, fresh]))
        return len(hit)

    def admit_verified():
        h = alloc.hash_tokens(tokens)
        ids, hits, _ = alloc.allocate_with_prefix(blocks, h[:matchable], tokens[:matchable * BS])
        alloc.free(ids)
        return hits

    benchmark.group = "admission"
    hits = benchmark(admit_verified if path == "verified" else admit_hash_only)
    assert hits == cached_blocks
    _medians[f"admission {path}"] = benchmark.stats.stats.median


@pytest.mark.parametrize("keyed", ["unkeyed", "keyed"])
def test_hash(benchmark, keyed):
    """hash_block_tokens of 65,536 tokens (4,096 blocks of 16), with key 0 and with a 128-bit key."""
    tokens = np.random.default_rng(1).integers(0, 150_000, size=65_536, dtype=np.int32)
    benchmark.group = "hash"
    hashes = benchmark(hash_block_tokens, tokens, BS, key=KEY if keyed == "keyed" else None)
    assert hashes.shape == (4096,)
    _medians[f"hash 65,536 tokens {keyed}"] = benchmark.stats.stats.median
