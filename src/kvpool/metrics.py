"""Prometheus metrics of a KV block pool, for a server to export.

Gauges: ``kvpool_blocks_total``, ``kvpool_free_blocks`` (allocatable now, evictable cached blocks
included), ``kvpool_used_blocks`` (referenced by a live sequence), ``kvpool_cached_blocks`` (holding a
prefix hash, in use or evictable). Counters: ``kvpool_prefix_hit_blocks_total``,
``kvpool_prefix_lookup_blocks_total``, ``kvpool_prefix_hash_collisions_total`` (a block hash matched a
cached block holding other tokens: refused, counted), ``kvpool_evictions_total``, ``kvpool_preemptions_total``,
``kvpool_requests_finished_total``, ``kvpool_requests_rejected_total``.

Metrics live in a caller-supplied ``CollectorRegistry`` (or a private one), never in the global
default registry, so two pools (or two tests) in one process do not collide.

Example
-------
>>> m = PoolMetrics()
>>> m.observe_pool(num_blocks=64, num_free_blocks=60, num_cached_blocks=8, prefix_hit_blocks=2)
>>> b"kvpool_used_blocks 4.0" in m.exposition()
True
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from .errors import InvalidArgumentError

LOOPBACK = "127.0.0.1"


class PoolMetrics:
    """Gauges and counters of one block pool, registered in ``registry`` (a new private one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "kvpool"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        self.total_blocks = Gauge("blocks_total", "Blocks in the pool", namespace=ns, registry=r)
        self.free_blocks = Gauge("free_blocks", "Blocks allocatable now (evictable cached blocks included)",
                                 namespace=ns, registry=r)
        self.used_blocks = Gauge("used_blocks", "Blocks referenced by a live sequence", namespace=ns, registry=r)
        self.cached_blocks = Gauge("cached_blocks", "Blocks holding a prefix hash (in use or evictable)",
                                   namespace=ns, registry=r)
        self.prefix_hits = Counter("prefix_hit_blocks", "Prompt blocks served from the prefix cache",
                                   namespace=ns, registry=r)
        self.prefix_lookups = Counter("prefix_lookup_blocks", "Full prompt blocks looked up in the prefix cache",
                                      namespace=ns, registry=r)
        self.hash_collisions = Counter(
            "prefix_hash_collisions", "Prefix-cache lookups whose hash matched a block holding other tokens "
            "(verified, refused, counted)", namespace=ns, registry=r)
        self.evictions = Counter("evictions", "Cached blocks evicted to make room", namespace=ns, registry=r)
        self.preemptions = Counter("preemptions", "Sequences preempted (blocks freed, recomputed later)",
                                   namespace=ns, registry=r)
        self.finished = Counter("requests_finished", "Requests that completed", namespace=ns, registry=r)
        self.rejected = Counter("requests_rejected", "Requests refused with an error", namespace=ns, registry=r)
        self._last: dict[str, int] = {}

    def _advance(self, counter: Counter, key: str, total: int | None) -> None:
        """Move ``counter`` up to the pool's running ``total`` (the pool keeps the count, we mirror it)."""
        if total is not None and total > self._last.get(key, 0):
            counter.inc(total - self._last.get(key, 0))
            self._last[key] = total

    def observe_pool(self, num_blocks: int, num_free_blocks: int, num_cached_blocks: int,
                     evictions: int | None = None, prefix_hit_blocks: int | None = None,
                     prefix_query_blocks: int | None = None, hash_collisions: int | None = None) -> None:
        """Set the gauges from a pool snapshot.

        ``evictions``, ``prefix_hit_blocks``, ``prefix_query_blocks`` and ``hash_collisions`` are the pool's running totals
        (as ``BlockAllocator.stats()`` keeps them); the counters advance to them.
        """
        if not 0 <= num_free_blocks <= num_blocks or not 0 <= num_cached_blocks <= num_blocks:
            raise InvalidArgumentError(
                f"pool snapshot out of range: num_blocks={num_blocks}, num_free_blocks={num_free_blocks}, "
                f"num_cached_blocks={num_cached_blocks}; pass the allocator's own counts"
            )
        self.total_blocks.set(num_blocks)
        self.free_blocks.set(num_free_blocks)
        self.used_blocks.set(num_blocks - num_free_blocks)
        self.cached_blocks.set(num_cached_blocks)
        self._advance(self.evictions, "evictions", evictions)
        self._advance(self.prefix_hits, "prefix_hit_blocks", prefix_hit_blocks)
        self._advance(self.prefix_lookups, "prefix_query_blocks", prefix_query_blocks)
        self._advance(self.hash_collisions, "hash_collisions", hash_collisions)

    def observe_allocator(self, allocator) -> None:
        """Set the gauges from a :class:`kvpool.allocator.BlockAllocator` (or its reference twin)."""
        stats = allocator.stats()
        self.observe_pool(allocator.num_blocks, allocator.num_free_blocks, allocator.num_cached_blocks,
                          evictions=stats.get("evictions"), prefix_hit_blocks=stats.get("prefix_hit_blocks"),
                          prefix_query_blocks=stats.get("prefix_query_blocks"),
                          hash_collisions=stats.get("hash_collisions"))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int):
        """Serve ``/metrics`` on ``127.0.0.1:port`` (loopback only) from a daemon thread; see :func:`serve`."""
        return serve(port, self.registry)


def serve(port: int, registry: CollectorRegistry):
    """Serve ``registry`` over HTTP on ``127.0.0.1:port`` only (never on a public interface).

    ``port=0`` picks a free port. Returns ``(server, thread)``; ``server.server_port`` is the port
    bound and ``server.shutdown()`` stops it.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"metrics port must be an int in [0, 65535] (0 = any free port); got {port!r}")
    return start_http_server(port, addr=LOOPBACK, registry=registry)
