"""The typed result of ``plan_memory``: `MemoryPlan`, its `KVPool`, in bytes; dicts only through ``to_dict()``.

Readers of the earlier dict form keep working: ``plan.kv_cache["num_blocks"]``, ``plan.per_gpu["weights_gib"]``
and ``plan.stages[0]`` read the JSON sections, while ``plan.kv_cache.num_blocks``, ``plan.term("weights").bytes``
and ``plan.per_stage[0]`` are the exact figures.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import plan_json
from .host_tier import HostTierCapacity
from .request import PlanRequest
from .stage import StageMemory, Term
from .vllm_kv import VLLMKVFigures
from .window_capacity import WindowCapacity, per_request_blocks

if TYPE_CHECKING:  # workload.py builds on this module
    from .workload import WorkloadCheck


class JSONSection(Mapping):
    """Read-only mapping access to a typed section through its JSON form (``section["num_blocks"]``)."""

    @abstractmethod
    def to_dict(self) -> dict:
        """The section's JSON form; every subclass defines it (mapping access reads through it)."""

    def __getitem__(self, key):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(frozen=True, eq=False)
class KVPool(JSONSection):
    """The KV pool of one GPU of the tightest stage (every rank holds the same block count), in bytes.

    ``bytes_per_token_all_gpus`` counts every TP rank and stage (replicated heads on each rank that holds
    them); ``per_seq_bytes_per_gpu_window_aware`` is what a sequence of ``max_model_len`` tokens would
    hold if sliding-window layers kept only their window (an engine with a per-layer-type pool).
    """

    kv_dtype: str
    bytes_per_token_per_gpu: int
    bytes_per_token_all_gpus: int
    block_size: int
    bytes_per_block_per_gpu: int
    num_blocks: int
    kv_bytes_per_gpu: int
    max_model_len: int
    per_seq_bytes_per_gpu_window_aware: int
    sliding_window_layers: int
    kv_heads_per_gpu: int
    group_windows: tuple = (None,)  # each KV-cache group's window (None: full attention)
    vllm: VLLMKVFigures | None = None  # what vLLM's log prints for the same KV bytes (`plan.vllm_kv`)
    window: WindowCapacity | None = None  # requests held with window freeing (models with sliding windows)
    host_tier: HostTierCapacity | None = None  # the host tier's blocks (``host_kv_gib`` given), else None

    @property
    def num_groups(self) -> int:
        """KV-cache groups (1 for a model with one attention kind)."""
        return len(self.group_windows)

    @property
    def tokens(self) -> int:
        """Tokens the pool holds in whole blocks when every group keeps every token (a hybrid model's
        block serves one group: ``num_blocks // num_groups * block_size``, vLLM's "GPU KV cache size")."""
        return self.num_blocks // self.num_groups * self.block_size

    def blocks_per_request(self, num_tokens: int) -> int:
        """Blocks one request of ``num_tokens`` computed tokens holds in all groups (windows freed)."""
        return per_request_blocks(self.group_windows, num_tokens, self.block_size)

    def requests_fit(self, num_tokens: int) -> int:
        """Requests of ``num_tokens`` computed tokens the pool holds at once."""
        return self.num_blocks // max(1, self.blocks_per_request(num_tokens))

    @property
    def tokens_unpaged(self) -> int:
        """Tokens the KV bytes would hold without block rounding (bytes ÷ bytes per token)."""
        return self.kv_bytes_per_gpu // self.bytes_per_token_per_gpu

    @property
    def per_seq_bytes_per_gpu(self) -> int:
        return self.bytes_per_token_per_gpu * self.max_model_len

    @property
    def unused_bytes_per_gpu(self) -> int:
        """KV bytes too few to make one more block."""
        return self.kv_bytes_per_gpu - self.num_blocks * self.bytes_per_block_per_gpu

    @property
    def max_concurrency(self) -> float:
        """Requests of ``max_model_len`` tokens the pool holds at once."""
        return self.tokens / self.max_model_len

    @property
    def max_concurrency_window_aware(self) -> float:
        """Requests of ``max_model_len`` tokens held when windowed layers keep only their window: the
        hybrid pool's figure (`WindowCapacity`) for a model with windows, else the plain bytes ratio."""
        if self.window is not None:
            return self.window.max_concurrency
        return self.kv_bytes_per_gpu / self.per_seq_bytes_per_gpu_window_aware

    def to_dict(self) -> dict:
        return plan_json.kv_cache_dict(self)


@dataclass(frozen=True, eq=False)
class MemoryPlan:
    """A computed deployment plan, in bytes. ``to_dict()`` is what ``kvpool plan --json`` prints.

    Attributes
    ----------
    request : PlanRequest
        The checked inputs (model spec, GPU preset, degrees, settings).
    per_stage : tuple of StageMemory
        Each pipeline stage's per-GPU memory; ``tightest`` indexes the one with the fewest blocks,
        which decides the pool (one block table for the whole model).
    budget_bytes, headroom_bytes : int
        What each GPU's process may use, and what it leaves unused (``total = budget + headroom``).
    model_weight_bytes : int
        The whole model's weights in the serving dtype (one GPU, every layer).
    kv_cache : KVPool
        The pool of one GPU; ``plan.kv_cache.num_blocks`` or ``plan.kv_cache["num_blocks"]``.
    workload : WorkloadCheck or None
        Whether ``request.batch`` sequences of ``request.seq_len`` tokens fit (when asked).
    before_snapshot : Term or None
        Device memory that exists before vLLM's start-up snapshot (CUDA context, NCCL communicators, custom
        all-reduce and symmetric-memory buffers): shown, never subtracted; it sits in the headroom.
    """

    request: PlanRequest
    per_stage: tuple[StageMemory, ...]
    tightest: int
    budget_bytes: int
    headroom_bytes: int
    model_weight_bytes: int
    kv_cache: KVPool
    workload: "WorkloadCheck | None" = None
    before_snapshot: Term | None = None

    # ---------------------------------------------------------------- exact figures
    @property
    def tight(self) -> StageMemory:
        """The stage that decides the block count."""
        return self.per_stage[self.tightest]

    def term(self, name: str) -> Term:
        """The tightest stage's term ``name`` ("weights", "activation", "comm", "overhead")."""
        return self.tight.term(name)

    @property
    def total_bytes(self) -> int:
        return self.request.total_bytes

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    # ---------------------------------------------------------------- the JSON sections (GiB, prose)
    @property
    def model(self) -> str:
        return self.request.spec.name

    @property
    def gpu(self) -> str:
        return self.request.gpu_label

    @property
    def parallel(self) -> dict:
        return plan_json.parallel_dict(self)

    @property
    def per_gpu(self) -> dict:
        return plan_json.per_gpu_dict(self)

    @property
    def stages(self) -> list[dict]:
        return [plan_json.stage_dict(s) for s in self.per_stage]

    @property
    def details(self) -> dict:
        return plan_json.details_dict(self)

    @property
    def assumptions(self) -> list[str]:
        return plan_json.assumptions(self)

    @property
    def warnings(self) -> list[str]:
        return plan_json.warnings(self)

    def to_dict(self) -> dict:
        return plan_json.plan_dict(self)


__all__ = ["MemoryPlan", "KVPool", "JSONSection"]
