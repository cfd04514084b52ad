"""Prometheus metrics of a KV block pool, for a server to export.

Gauges: ``kvpool_blocks_total``, ``kvpool_free_blocks`` (allocatable now, evictable cached blocks
included), ``kvpool_used_blocks`` (referenced by a live sequence), ``kvpool_cached_blocks`` (holding a
prefix hash, in use or evictable). Counters: ``kvpool_prefix_hit_blocks_total``,
``kvpool_prefix_lookup_blocks_total``, ``kvpool_prefix_hash_collisions_total`` (a block hash matched a
cached block holding other tokens: refused, counted), ``kvpool_evictions_total``, ``kvpool_preemptions_total``,
``kvpool_requests_finished_total``, ``kvpool_requests_rejected_total``.

The host tier (issue 14) has its own :class:`HostTierMetrics` (``kvpool_host_*``), registered beside
them in the same registry: ``HostTierMetrics(registry=pool_metrics.registry)``.

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


def _count(value, what: str) -> int:
    """A non-negative int (Python/numpy; not a bool), else InvalidArgumentError naming ``what``."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or value.__index__() < 0:
        raise InvalidArgumentError(f"{what}={value!r} must be a non-negative integer")
    return value.__index__()


class HostTierMetrics:
    """Counters and gauges of the host-memory tier (``kvpool.tier``), in ``registry`` (a new private one if None).

    Counters (advanced by the tier as it works; each call adds):

    ========================================== ==========================================================
    ``kvpool_host_hit_blocks_total``            prompt blocks found on the host by ``add()`` (reloaded, not
                                                recomputed): :meth:`record_host_hits`
    ``kvpool_host_offloaded_blocks_total``      blocks copied GPU -> host (enqueued): :meth:`record_offload`
    ``kvpool_host_offloaded_bytes_total``       their bytes
    ``kvpool_host_reloaded_blocks_total``       blocks copied host -> GPU (enqueued): :meth:`record_reload`
    ``kvpool_host_reloaded_bytes_total``        their bytes
    ``kvpool_host_offload_skipped_blocks_total`` blocks not copied because the host held their hash already
    ========================================== ==========================================================

    Gauges (:meth:`observe_host_pool` / :meth:`observe_host_allocator`): ``kvpool_host_blocks_total``,
    ``kvpool_host_free_blocks``, ``kvpool_host_cached_blocks``; counter ``kvpool_host_evictions_total``
    mirrors the host allocator's running total. Two ways to feed them: push (``BlockCopier(..., metrics=m)``
    calls :meth:`record_offload` / :meth:`record_reload` as it enqueues, the tier calls
    :meth:`record_host_hits`), or mirror a tier's running totals after each step with :meth:`observe_tier`.

    Example
    -------
    >>> m = HostTierMetrics()
    >>> m.record_offload(blocks=4, nbytes=4 * 2097152)
    >>> m.record_host_hits(3)
    >>> b"kvpool_host_offloaded_bytes_total 8.388608e+06" in m.exposition()
    True
    """

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "kvpool"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        self.host_hits = Counter("host_hit_blocks", "Prompt blocks found in the host tier (reloaded, not recomputed)",
                                 namespace=ns, registry=r)
        self.offloaded_blocks = Counter("host_offloaded_blocks", "Blocks copied GPU to host", namespace=ns, registry=r)
        self.offloaded_bytes = Counter("host_offloaded_bytes", "Bytes copied GPU to host", namespace=ns, registry=r)
        self.reloaded_blocks = Counter("host_reloaded_blocks", "Blocks copied host to GPU", namespace=ns, registry=r)
        self.reloaded_bytes = Counter("host_reloaded_bytes", "Bytes copied host to GPU", namespace=ns, registry=r)
        self.offload_skipped = Counter("host_offload_skipped_blocks", "Blocks not offloaded: the host held their "
                                       "hash already", namespace=ns, registry=r)
        self.host_evictions = Counter("host_evictions", "Host blocks evicted to make room", namespace=ns, registry=r)
        self.total_blocks = Gauge("host_blocks_total", "Blocks in the host tier", namespace=ns, registry=r)
        self.free_blocks = Gauge("host_free_blocks", "Host blocks allocatable now (evictable cached ones included)",
                                 namespace=ns, registry=r)
        self.cached_blocks = Gauge("host_cached_blocks", "Host blocks holding a prefix hash", namespace=ns,
                                   registry=r)
        self._last: dict[str, int] = {}

    def _advance(self, counter: Counter, key: str, total) -> None:
        """Move ``counter`` up to a running ``total`` kept elsewhere (the tier counts, we mirror)."""
        if total is not None and total > self._last.get(key, 0):
            counter.inc(total - self._last.get(key, 0))
            self._last[key] = total

    def record_offload(self, blocks: int, nbytes: int) -> None:
        """``blocks`` blocks (``nbytes`` bytes) enqueued GPU -> host."""
        blocks, nbytes = _count(blocks, "blocks"), _count(nbytes, "nbytes")
        self.offloaded_blocks.inc(blocks)
        self.offloaded_bytes.inc(nbytes)

    def record_reload(self, blocks: int, nbytes: int) -> None:
        """``blocks`` blocks (``nbytes`` bytes) enqueued host -> GPU."""
        blocks, nbytes = _count(blocks, "blocks"), _count(nbytes, "nbytes")
        self.reloaded_blocks.inc(blocks)
        self.reloaded_bytes.inc(nbytes)

    def record_host_hits(self, blocks: int) -> None:
        """``blocks`` prompt blocks matched on the host by one ``add()``."""
        self.host_hits.inc(_count(blocks, "blocks"))

    def record_offload_skipped(self, blocks: int) -> None:
        """``blocks`` newly cached GPU blocks whose hash the host already held (no copy)."""
        self.offload_skipped.inc(_count(blocks, "blocks"))

    def observe_host_pool(self, num_blocks: int, num_free_blocks: int, num_cached_blocks: int,
                          evictions: int | None = None) -> None:
        """Set the gauges from a host-allocator snapshot; ``evictions`` is its running total."""
        if not 0 <= num_free_blocks <= num_blocks or not 0 <= num_cached_blocks <= num_blocks:
            raise InvalidArgumentError(
                f"host pool snapshot out of range: num_blocks={num_blocks}, num_free_blocks={num_free_blocks}, "
                f"num_cached_blocks={num_cached_blocks}; pass the host allocator's own counts")
        self.total_blocks.set(num_blocks)
        self.free_blocks.set(num_free_blocks)
        self.cached_blocks.set(num_cached_blocks)
        self._advance(self.host_evictions, "evictions", evictions)

    def observe_host_allocator(self, allocator) -> None:
        """Set the gauges from the host tier's :class:`kvpool.allocator.BlockAllocator`."""
        self.observe_host_pool(allocator.num_blocks, allocator.num_free_blocks, allocator.num_cached_blocks,
                               evictions=allocator.stats().get("evictions"))

    def observe_tier(self, tier) -> None:
        """Mirror a ``kvpool.HostKVTier``'s running totals (``tier.stats()``) and its host pool's gauges.

        Reads ``host_hit_blocks`` (each hit is one reloaded block), ``offloaded_blocks``, ``skipped_blocks``,
        ``host_free_blocks``, ``host_cached_blocks``, ``host_evictions``; bytes are blocks x the tier's
        ``bytes_per_block``. Use this OR ``BlockCopier(..., metrics=self)`` for the copy counters, not both.
        """
        s = tier.stats()
        per_block = getattr(getattr(tier, "copier", None), "bytes_per_block", None)  # None: a stand-in copier
        hits, offloaded = s.get("host_hit_blocks"), s.get("offloaded_blocks")
        self._advance(self.host_hits, "host_hit_blocks", hits)
        self._advance(self.reloaded_blocks, "reloaded_blocks", hits)
        self._advance(self.offloaded_blocks, "offloaded_blocks", offloaded)
        if per_block is not None:
            self._advance(self.reloaded_bytes, "reloaded_bytes", None if hits is None else hits * per_block)
            self._advance(self.offloaded_bytes, "offloaded_bytes",
                          None if offloaded is None else offloaded * per_block)
        self._advance(self.offload_skipped, "skipped_blocks", s.get("skipped_blocks"))
        if "host_free_blocks" in s:
            self.observe_host_pool(tier.num_host_blocks, s["host_free_blocks"], s.get("host_cached_blocks", 0),
                                   evictions=s.get("host_evictions"))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def serve(port: int, registry: CollectorRegistry):
    """Serve ``registry`` over HTTP on ``127.0.0.1:port`` only (never on a public interface).

    ``port=0`` picks a free port. Returns ``(server, thread)``; ``server.server_port`` is the port
    bound and ``server.shutdown()`` stops it.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"metrics port must be an int in [0, 65535] (0 = any free port); got {port!r}")
    return start_http_server(port, addr=LOOPBACK, registry=registry)
