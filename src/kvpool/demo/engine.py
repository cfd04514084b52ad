"""The serving loop: model + kvpool's pages, block tables, allocator and kernels.

Start-up (every TP rank): ``size_kv_pool`` agrees on one block count for the group, then each rank
builds its own :class:`kvpool.cache.PagedKVCache` shard (its KV heads only) and its own
``BlockAllocator`` + ``BlockTables``.

One allocator decision for the group: every rank runs the same deterministic
:class:`~kvpool.demo.scheduler.Scheduler` on the same requests, and rank 0's sampled tokens are
broadcast each step, so every rank makes the same allocations and frees in the same order and holds
the same block ids. The engine checks that on every step: each rank digests its block table and slot
mapping and the digests are all-gathered; any difference raises :class:`RankMismatchError`.
(Nothing but one small int64 tensor of tokens and one digest per rank crosses processes per step.)

One step: the scheduler's batch (prefills first, then decodes) becomes one ``BlockTables.batch``;
each layer writes the new tokens' K/V with ``write_kv`` and attends with ONE ``paged_attention`` call
straight over the pages: prefill chunks read their cached prefix and themselves (the tiled
``paged_prefill`` kernel, no gathered copy), decode rows their context (a decode-only step runs the
split-K ``paged_decode``). The KV cache is read only through those kernels.

Hybrid models (sliding-window layers beside full-attention ones): the pages hold one KV-cache group
per attention kind (``cache.kv_groups``), the tables one block list per group and sequence, all drawn
from the one allocator; layer ``i`` reads and writes group ``cache.group_of(i)``'s tables
(``batch.group(g)``) and attends to its window only (``paged_attention(..., sliding_window=W)``). A windowed
group's blocks that leave the window go back to the pool at
``mark_computed``; :mod:`~kvpool.demo.group_usage` counts what each group held.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, InvalidArgumentError, RankMismatchError
from .group_usage import GroupUsage, group_usages, observe_tables
from .model import TinyLlama
from .requests import Request, RequestResult
from .scheduler import Scheduler, StepPlan


@dataclass
class RunSummary:
    """What a run did (the demo's final summary)."""

    results: dict[int, RequestResult]
    num_blocks: int
    block_size: int
    steps: int
    wall_s: float
    prompt_tokens: int
    computed_prompt_tokens: int
    generated_tokens: int
    peak_used_blocks: int
    prefix_hit_rate: float
    preemptions: int
    mixed_steps: int = 0
    max_batch_seqs: int = 0
    block_digests: list[int] = field(default_factory=list)
    group_usage: list[GroupUsage] = field(default_factory=list)  # one per KV-cache group
    host_tier: dict | None = None  # HostKVTier.stats() plus "blocks", when the host tier is on
    elastic: object = None  # --elastic: the pool's ElasticStats (kvpool.demo.elastic)

    @property
    def finished(self) -> int:
        return sum(r.error is None for r in self.results.values())

    @property
    def rejected(self) -> int:
        return sum(r.error is not None for r in self.results.values())

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0


class Engine:
    """One TP rank of the demo server.

    Parameters
    ----------
    model_config : dict
        Hugging Face Llama or Qwen2 config dict (:func:`kvpool.demo.model.tiny_llama_config`,
        :func:`kvpool.demo.model.tiny_hybrid_config`).
    weights : dict[str, torch.Tensor]
        Full fp32 weights (each rank slices its shard).
    host_kv_bytes : int
        Pinned host memory of the host tier of the prefix cache on each rank (0: no host tier); its block
        count is ``host_kv_bytes // bytes_per_block`` (the same on every rank).
    pool_bytes : int
        Device memory given to the KV pool on each rank (``device_memory_bytes`` of ``size_kv_pool``).
    block_size : int
    tp_rank, tp_size : int
    group : ProcessGroup, optional
        The TP group (default: the world group when ``tp_size > 1``).
    device : str or torch.device
    max_batch_tokens, max_running : int
        Scheduler limits (see :class:`Scheduler`).
    enable_prefix_caching : bool
    metrics : kvpool.metrics.PoolMetrics, optional
    window_freeing : bool
        False: the tables give every KV-cache group full attention's block lists (nothing is freed
        when it leaves a window; the layers still attend to their windows only), to compare with.
    elastic : bool
        An :class:`~kvpool.ElasticKVPool` of up to the agreed block count, starting at a quarter of it,
        grown under load and shrunk when idle (:mod:`kvpool.demo.elastic`).
    """

    def __init__(self, model_config: dict, weights: dict, *, pool_bytes: int, block_size: int = 16,
                 tp_rank: int = 0, tp_size: int = 1, group=None, device="cpu", max_batch_tokens: int = 256,
                 max_running: int = 16, enable_prefix_caching: bool = True, metrics=None,
                 window_freeing: bool = True, host_kv_bytes: int = 0,
                 elastic: bool = False):
        from ..allocator import BlockAllocator
        from ..block_table import BlockTables
        from ..cache import PagedKVCache
        from ..plan import load_model_spec
        from ..runtime import size_kv_pool

        self.device = torch.device(device)
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.model = TinyLlama(model_config, weights, tp_rank, tp_size, group, self.device)
        spec = load_model_spec(model_config)
        if self.device.type == "cuda":
            # A GPU is measured: declare a device of (what is in use now + pool_bytes). Memory torch's
            # caching allocator reserved but does not use counts as free for the pool, so leave it out.
            free, total = torch.cuda.mem_get_info(self.device)
            idle_reserved = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            memory = {"device_memory_bytes": int(total - free - idle_reserved + pool_bytes)}
        else:
            memory = {"device_memory_bytes": int(pool_bytes), "in_use_bytes": 0}
        self.pool = size_kv_pool(spec, block_size, group=group if tp_size > 1 else None, mem_fraction=1.0,
                                 kv_dtype="fp32", tp_rank=tp_rank, tp_size=tp_size, device=self.device,
                                 activation_bytes=0, max_batched_tokens=max_batch_tokens, **memory)
        self.num_blocks, self.block_size = int(self.pool.num_blocks), int(self.pool.block_size)
        if elastic and host_kv_bytes:
            raise InvalidArgumentError("--elastic with --host-kv-mib is not supported yet (a shrink cannot move a "
                                       "block whose host copy is in flight); use one or the other")
        if elastic:
            from .elastic import elastic_pages

            self.cache, self.allocator = elastic_pages(spec, self.num_blocks, self.block_size, tp_rank, tp_size,
                                                       self.device, enable_prefix_caching=enable_prefix_caching,
                                                       hash_key=self.pool.hash_key)
        else:
            self.cache = PagedKVCache.for_shard(spec, self.num_blocks, self.block_size, tp_rank, tp_size,
                                                self.device, dtype=torch.float32, kv_dtype="fp32")
            # One hash key on every rank (drawn on rank 0 by size_kv_pool): the ranks' prefix caches
            # then make the same decisions and hand out the same block ids.
            self.allocator = BlockAllocator(self.num_blocks, self.block_size,
                                            enable_prefix_caching=enable_prefix_caching, hash_key=self.pool.hash_key)
        if list(self.cache.kv_head_ids) != self.model.kv_head_ids:
            raise RankMismatchError(
                f"rank {tp_rank}: the KV cache holds heads {list(self.cache.kv_head_ids)} but the model shard "
                f"computes heads {self.model.kv_head_ids}; both must split KV heads the same way")
        groups = self.cache.kv_groups
        self.layer_group = [self.cache.group_of(i) for i in range(self.model.num_layers)]
        for i, g in enumerate(self.layer_group):
            if groups.groups[g].window != self.model.layer_windows[i]:
                raise ConfigError(
                    f"layer {i} attends to window {self.model.layer_windows[i]} but its KV-cache group {g} has "
                    f"window {groups.groups[g].window}; the model and the pages must read one config")
        table_windows = groups.windows if window_freeing else (None,) * len(groups.groups)
        self.tier = self._host_tier(host_kv_bytes, table_windows, enable_prefix_caching)
        self.tables = BlockTables(self.allocator, self.block_size, self.device, max_seqs=max_running,
                                  group_windows=table_windows, host_tier=self.tier,
                                  max_blocks_per_seq=self.num_blocks)
        self.group_usage = group_usages(groups, self.block_size)
        self.metrics = metrics
        self.host_metrics = None
        if metrics is not None and self.tier is not None:
            from ..metrics import HostTierMetrics

            self.host_metrics = HostTierMetrics(metrics.registry)
        self.scheduler = Scheduler(self.tables, self.model.vocab_size,
                                   int(model_config["max_position_embeddings"]), max_batch_tokens, max_running,
                                   metrics)
        self.elastic = None
        if elastic:
            from ..elastic import ElasticKVPool
            from .elastic import ElasticPolicy

            self.scheduler.num_blocks = self.num_blocks  # a request may use the whole reserved pool
            self.elastic = ElasticPolicy(ElasticKVPool(self.cache, self.allocator, self.tables, group=group),
                                         self.scheduler)
        self.peak_used_blocks = 0
        self.mixed_steps = 0  # steps that ran prefills and decodes together
        self.max_batch_seqs = 0
        self.block_digests: list[int] = []
        self.computed_prompt_tokens = 0

    def _host_tier(self, host_kv_bytes: int, windows, prefix_caching: bool):
        """A `HostKVTier` of ``host_kv_bytes`` on this rank, or None."""
        if host_kv_bytes <= 0:
            return None
        if windows != (None,) or not prefix_caching:
            raise ConfigError("--host-kv-mib needs prefix caching and one full-attention KV-cache group (the "
                              "host tier refuses hybrid models): use --model llama without --no-prefix-caching")
        from ..tier import HostKVTier

        per_block = self.cache.memory_bytes() // self.num_blocks
        blocks = host_kv_bytes // per_block
        if blocks < 1:
            raise ConfigError(f"--host-kv-mib gives {host_kv_bytes} bytes, less than one block of {per_block}: "
                              "give the host tier at least one block")
        return HostKVTier(self.cache, blocks)

    # ----------------------------------------------------------------- one step
    def step(self, step: int) -> tuple[StepPlan, list[int]]:
        """Schedule and run one step; return the plan and the ids of the requests it finished."""
        if self.tier is not None:
            self.tier.poll()  # copies done since the last step give their blocks back before scheduling
        if self.elastic is not None:  # grow under load, shrink when idle (collective, the same on every rank)
            self.elastic.before_step()
        plan = self.scheduler.schedule(step)
        if self.tier is not None:  # host hits are copied back (and blocks offloaded) before the forward
            self.tier.run(self.tables.pop_transfers())
        self._observe_pool()
        if not plan.entries:
            return plan, []
        entries = plan.entries
        n_pre = sum(e.is_prefill for e in entries)
        assert all(e.is_prefill for e in entries[:n_pre]), "the scheduler puts prefills first"
        self.mixed_steps += 0 < n_pre < len(entries)
        self.max_batch_seqs = max(self.max_batch_seqs, len(entries))
        if plan.decode_step:  # the fast path: append one token to each and build the step, one call
            ids = np.fromiter((e.seq_id for e in entries), np.int64, len(entries))
            batch = self.tables.decode_step(ids, np.fromiter((e.token_ids[0] for e in entries), np.int32, len(entries)))
        else:
            batch = self.tables.batch([e.seq_id for e in entries])
        self._check_ranks_agree(batch)

        tokens = torch.tensor([t for e in entries for t in e.token_ids], dtype=torch.int64, device=self.device)
        positions = torch.tensor([e.start_pos + j for e in entries for j in range(len(e.token_ids))],
                                 dtype=torch.int64, device=self.device)
        qsl = np.concatenate([[0], np.cumsum([len(e.token_ids) for e in entries])])
        if not np.array_equal(qsl, batch.query_start_loc.cpu().numpy()):
            raise RankMismatchError(f"step {step}: BlockTables' new tokens {batch.query_start_loc.tolist()} "
                                    f"differ from the scheduler's {qsl.tolist()}")
        self.computed_prompt_tokens += int(qsl[n_pre])
        attention = self._attention_fn(batch.query_start_loc, [batch.group(g) for g in range(self.tables.num_groups)])
        logit_rows = torch.as_tensor(qsl[1:] - 1, dtype=torch.int64, device=self.device)
        logits = self.model.forward(tokens, positions, attention, logit_rows)
        next_tokens = logits.argmax(dim=-1)
        if self.tp_size > 1:  # rank 0 decides; every rank's scheduler sees the same tokens
            import torch.distributed as dist

            dist.broadcast(next_tokens, src=_global_rank(self.group, 0), group=self.group)
        self.tables.mark_computed(batch)  # publishes full prompt blocks; windowed groups free what left the window
        observe_tables(self.group_usage, self.tables, [e.seq_id for e in entries])
        finished = self.scheduler.finish_step(plan, next_tokens.tolist())
        self._observe_pool()
        return plan, finished

    def _attention_fn(self, query_start_loc, group_batches):
        """The model's attention callback for one step: layer ``i`` writes and reads the pages of its slot
        through its group's tables, within its window, in one ``paged_attention`` call for the whole batch."""
        from ..kernels import paged_attention, write_kv

        scale = self.model.scale

        def attention(layer: int, q, k, v):
            k_cache, v_cache = self.cache.k_caches[layer], self.cache.v_caches[layer]
            window, group = self.model.layer_windows[layer], group_batches[self.layer_group[layer]]
            write_kv(k, v, k_cache, v_cache, group.slot_mapping)
            # a windowed group's released blocks (0 in its table) lie below every query's window: never read
            return paged_attention(q, k_cache, v_cache, group.block_table, query_start_loc, group.seq_lens, scale,
                                   sliding_window=window)

        return attention

    # ----------------------------------------------------------------- whole run
    def run(self, requests: list[Request], progress: bool = False) -> RunSummary:
        """Serve ``requests`` (arriving at their ``arrival_step``) until every one finished or was refused."""
        for request in requests:
            self.scheduler.submit(request)
        bar = _progress_bar(len(requests)) if progress else None
        reported: set[int] = set()
        step, start = 0, time.perf_counter()
        while not self.scheduler.done:
            plan, _ = self.step(step)
            if bar is not None:
                done = [i for i, r in self.scheduler.results.items()
                        if i not in reported and (r.error is not None or r.finish_step is not None)]
                reported.update(done)
                bar.update(len(done))
            nxt = self.scheduler.next_arrival()
            idle = not plan.entries and not self.scheduler.waiting and not self.scheduler.running
            step = max(step + 1, nxt) if idle and nxt is not None else step + 1
        if self.tier is not None:  # the last step's offloads: enqueue them and wait, so every block is free
            self.tier.run(self.tables.pop_transfers())
            self.tier.synchronize()
        if self.elastic is not None:
            self.elastic.finish()
        wall = time.perf_counter() - start
        if bar is not None:
            bar.close()
        s = self.scheduler
        return RunSummary(
            results=s.results, num_blocks=self.num_blocks, block_size=self.block_size, steps=step, wall_s=wall,
            prompt_tokens=s.prompt_tokens_seen, computed_prompt_tokens=self.computed_prompt_tokens,
            generated_tokens=sum(len(r.output) for r in s.results.values()),
            peak_used_blocks=self.peak_used_blocks,
            prefix_hit_rate=s.prompt_tokens_cached / s.prompt_tokens_seen if s.prompt_tokens_seen else 0.0,
            preemptions=s.num_preemptions, mixed_steps=self.mixed_steps, max_batch_seqs=self.max_batch_seqs,
            block_digests=list(self.block_digests), group_usage=self.group_usage,
            host_tier=None if self.tier is None else dict(self.tier.stats(), blocks=self.tier.num_host_blocks),
            elastic=self.elastic.stats if self.elastic is not None else None)

    # ----------------------------------------------------------------- helpers
    def _observe_pool(self) -> None:
        used = self.allocator.num_blocks - self.allocator.num_free_blocks
        self.peak_used_blocks = max(self.peak_used_blocks, used)
        if self.metrics is not None:
            self.metrics.observe_allocator(self.allocator)
            if self.tier is not None:  # kvpool_host_* beside the pool's metrics, on the same /metrics page
                self.host_metrics.observe_tier(self.tier)

    def _check_ranks_agree(self, batch) -> None:
        """All-gather a digest of this step's block table + slot mapping; raise if any rank differs."""
        crc = zlib.crc32(batch.block_table.cpu().numpy().tobytes())
        crc = zlib.crc32(batch.slot_mapping.cpu().numpy().tobytes(), crc)
        self.block_digests.append(crc)
        if self.tp_size == 1:
            return
        import torch.distributed as dist

        # gloo all-gathers host tensors only (its CUDA support covers broadcast and all-reduce)
        where = "cpu" if dist.get_backend(self.group) == "gloo" else self.device
        mine = torch.tensor([crc], dtype=torch.int64, device=where)
        every = [torch.empty_like(mine) for _ in range(self.tp_size)]
        dist.all_gather(every, mine, group=self.group)
        values = [int(t) for t in every]
        if len(set(values)) != 1:
            raise RankMismatchError(
                f"block tables differ across TP ranks at step {len(self.block_digests) - 1}: digests {values}; "
                "every rank must run the same scheduler on the same requests and tokens")


def _global_rank(group, rank: int) -> int:
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


def _progress_bar(total: int):
    """A tqdm bar over the requests, or None (no bar) when tqdm is not installed: it is only decoration."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True, leave=True)
