"""kvpool.metrics: Prometheus gauges/counters of a block pool, private registries, loopback server."""
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kvpool.errors import InvalidArgumentError
from kvpool.metrics import PoolMetrics, serve


def samples(metrics: PoolMetrics) -> dict:
    text = metrics.exposition().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_gauges_follow_a_pool_snapshot():
    m = PoolMetrics()
    m.observe_pool(num_blocks=64, num_free_blocks=60, num_cached_blocks=8)
    s = samples(m)
    assert s["kvpool_blocks_total"] == 64
    assert s["kvpool_free_blocks"] == 60
    assert s["kvpool_used_blocks"] == 4
    assert s["kvpool_cached_blocks"] == 8


def test_counters_mirror_the_pools_running_totals():
    m = PoolMetrics()
    m.observe_pool(8, 8, 0, evictions=3, prefix_hit_blocks=2, prefix_query_blocks=5)
    m.observe_pool(8, 8, 0, evictions=3, prefix_hit_blocks=6, prefix_query_blocks=9)
    m.preemptions.inc()
    s = samples(m)
    assert s["kvpool_evictions_total"] == 3  # same total twice: counted once
    assert s["kvpool_prefix_hit_blocks_total"] == 6
    assert s["kvpool_prefix_lookup_blocks_total"] == 9
    assert s["kvpool_preemptions_total"] == 1


def test_two_pools_do_not_collide_and_a_shared_registry_is_used():
    a, b = PoolMetrics(), PoolMetrics()  # private registries: no "Duplicated timeseries" error
    a.observe_pool(10, 1, 0)
    b.observe_pool(20, 20, 0)
    assert samples(a)["kvpool_used_blocks"] == 9 and samples(b)["kvpool_used_blocks"] == 0
    registry = CollectorRegistry()
    c = PoolMetrics(registry)
    assert c.registry is registry
    c.observe_pool(4, 2, 1)
    assert registry.get_sample_value("kvpool_used_blocks") == 2


def test_bad_snapshot_is_refused_before_any_change():
    m = PoolMetrics()
    m.observe_pool(8, 8, 0)
    with pytest.raises(InvalidArgumentError, match="num_free_blocks=9"):
        m.observe_pool(8, 9, 0)
    assert samples(m)["kvpool_free_blocks"] == 8


def test_observe_allocator_reads_a_real_allocator():
    from kvpool._reference import ReferenceBlockAllocator, hash_block_tokens

    alloc = ReferenceBlockAllocator(8, block_size=4)
    ids = alloc.allocate(3)
    alloc.cache_blocks(ids[:2], hash_block_tokens(list(range(8)), 4))
    alloc.free(ids)
    hit = alloc.match_prefix(hash_block_tokens(list(range(8)), 4))
    m = PoolMetrics()
    m.observe_allocator(alloc)
    s = samples(m)
    assert len(hit) == 2
    assert s["kvpool_used_blocks"] == 2 and s["kvpool_free_blocks"] == 6
    assert s["kvpool_cached_blocks"] == alloc.num_cached_blocks
    assert s["kvpool_prefix_hit_blocks_total"] == 2


def test_hash_collisions_are_exported():
    from kvpool.allocator import BlockAllocator

    alloc = BlockAllocator(8, block_size=2)
    ids, _, _ = alloc.allocate_with_prefix(1, [7], [1, 2])
    alloc.cache_blocks_verified(ids, [7], [1, 2])
    alloc.allocate_with_prefix(1, [7], [3, 4])  # same (injected) hash, other tokens: a collision
    m = PoolMetrics()
    m.observe_allocator(alloc)
    assert samples(m)["kvpool_prefix_hash_collisions_total"] == 1


def test_serve_binds_loopback_only_and_serves_the_registry():
    m = PoolMetrics()
    m.observe_pool(16, 10, 3)
    server, thread = m.serve(0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
        assert "kvpool_used_blocks 6.0" in body
    finally:
        server.shutdown()


@pytest.mark.parametrize("port", [-1, 70000, "9400"])
def test_bad_port_is_refused(port):
    with pytest.raises(InvalidArgumentError, match="port"):
        serve(port, CollectorRegistry())


def test_host_tier_counters_and_gauges_share_the_pool_registry():
    from kvpool.metrics import HostTierMetrics
    pool = PoolMetrics()
    m = HostTierMetrics(pool.registry)
    m.record_offload(blocks=4, nbytes=4 * 2097152)
    m.record_offload(blocks=1, nbytes=2097152)
    m.record_reload(blocks=2, nbytes=2 * 2097152)
    m.record_host_hits(2)
    m.record_offload_skipped(3)
    m.observe_host_pool(num_blocks=100, num_free_blocks=90, num_cached_blocks=40, evictions=5)
    m.observe_host_pool(num_blocks=100, num_free_blocks=90, num_cached_blocks=40, evictions=5)
    s = samples(pool)  # one registry: the pool's metrics and the host tier's, side by side
    assert s["kvpool_host_offloaded_blocks_total"] == 5 and s["kvpool_host_offloaded_bytes_total"] == 5 * 2097152
    assert s["kvpool_host_reloaded_blocks_total"] == 2 and s["kvpool_host_reloaded_bytes_total"] == 2 * 2097152
    assert s["kvpool_host_hit_blocks_total"] == 2 and s["kvpool_host_offload_skipped_blocks_total"] == 3
    assert (s["kvpool_host_blocks_total"], s["kvpool_host_free_blocks"], s["kvpool_host_cached_blocks"]) == (100, 90, 40)
    assert s["kvpool_host_evictions_total"] == 5 and s["kvpool_blocks_total"] == 0
    assert b"kvpool_host_offloaded_bytes_total 1.048576e+07" in m.exposition()


@pytest.mark.parametrize("call", [
    lambda m: m.record_offload(-1, 0), lambda m: m.record_reload(1, 2.5), lambda m: m.record_host_hits(True),
    lambda m: m.observe_host_pool(4, 5, 0),
])
def test_host_tier_metrics_refuse_bad_counts(call):
    from kvpool.metrics import HostTierMetrics
    m = HostTierMetrics()
    with pytest.raises(InvalidArgumentError):
        call(m)
    assert samples(m)["kvpool_host_offloaded_blocks_total"] == 0 and samples(m)["kvpool_host_reloaded_blocks_total"] == 0


def test_host_tier_metrics_mirror_a_tiers_running_totals():
    from types import SimpleNamespace

    from kvpool.metrics import HostTierMetrics
    totals = {"host_hit_blocks": 3, "offloaded_blocks": 10, "skipped_blocks": 2, "host_free_blocks": 50,
              "host_cached_blocks": 12, "host_evictions": 1}
    tier = SimpleNamespace(stats=lambda: dict(totals), num_host_blocks=64, copier=SimpleNamespace(bytes_per_block=100))
    m = HostTierMetrics()
    m.observe_tier(tier)
    m.observe_tier(tier)  # the same totals again: counted once
    totals.update(host_hit_blocks=5, offloaded_blocks=11)
    m.observe_tier(tier)
    s = samples(m)
    assert (s["kvpool_host_hit_blocks_total"], s["kvpool_host_reloaded_blocks_total"]) == (5, 5)
    assert (s["kvpool_host_reloaded_bytes_total"], s["kvpool_host_offloaded_bytes_total"]) == (500, 1100)
    assert s["kvpool_host_offloaded_blocks_total"] == 11 and s["kvpool_host_offload_skipped_blocks_total"] == 2
    assert (s["kvpool_host_blocks_total"], s["kvpool_host_free_blocks"], s["kvpool_host_cached_blocks"]) == (64, 50, 12)
    assert s["kvpool_host_evictions_total"] == 1
