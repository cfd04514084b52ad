"""``size_kv_pool``: the call a tensor-parallel server makes on every rank after loading its weights.

Its named steps, in the order every rank runs them (the same collectives in the same order; every step
that can fail on one rank runs through ``group.gather_step``, which exchanges its status, so a failure
raises the same ``KVPoolError`` on every rank instead of hanging):

1. ``exchange_settings``: check the arguments and take the first memory snapshot (``prepare``, before any
   collective, so the NCCL communicator's memory shows up in the difference), then one
   ``all_gather_object`` of the settings digest, the ``tp_rank`` and TP rank 0's prefix-cache hash key:
   a mismatch raises ``RankMismatchError`` everywhere, duplicate or missing ``tp_rank`` values
   ``InvalidArgumentError`` everywhere;
2. ``warm_up_and_profile``: NCCL groups run one warm-up all-reduce of the largest message
   (``max_batched_tokens x hidden x dtype``), then ``profile_fn`` runs under ``reset_peak_memory_stats``
   (failure: ``ProfileError`` everywhere);
3. ``agree_on_min``: each rank measures its own ``RankFigures`` (``figures.rank_figures``), every rank's
   go round, and the pool is the MIN block count (``PlanError`` everywhere when it is 0);
4. ``build_pool_size``: the deciding rank's figures beside the planner's prediction, logged at INFO on
   logger ``kvpool.runtime``.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any, Callable, Optional

from .. import errors
from . import digest as _digest
from . import group as _group
from . import measure as _measure
from .figures import Warmed, no_block_message, rank_figures
from .pool_size import PoolSize, RankFigures
from .predict import predict
from .prepare import Prepared, SizeRequest, prepare
from .tp_ranks import check_tp_ranks

logger = logging.getLogger("kvpool.runtime")


def size_kv_pool(
    spec: Any,
    block_size: int = 16,
    group: Any = None,
    mem_fraction: float = 0.9,
    profile_fn: Optional[Callable[[], object]] = None,
    kv_dtype: str = "auto",
    headroom: int | float = 0,
    *,
    tp_rank: Optional[int] = None,
    tp_size: Optional[int] = None,
    device: Any = None,
    device_memory_bytes: Optional[int] = None,
    activation_bytes: Optional[int] = None,
    in_use_bytes: Optional[int] = None,
    fp8_scales: str = "per_token_head",
    max_batched_tokens: int = 8192,
    max_seqs: int = 256,
    gpu: str = "h100-sxm",
) -> PoolSize:
    """Measure this rank's memory, agree with the group on one block count, and return the pool size.

    Call it on every rank of ``group`` after loading the weights, then ``PagedKVCache.for_shard(spec,
    size.num_blocks, size.block_size, ...)`` and ``BlockAllocator(..., hash_key=size.hash_key)``. Integers: any
    integer type (numpy, ``__index__``), not ``bool`` or ``float``; strings are case-blind.

    Parameters
    ----------
    spec : ModelSpec or str or path or dict
        A ``ModelSpec`` or anything ``kvpool.load_model_spec`` takes.
    block_size : int
        Tokens per block, a power of two.
    group : ProcessGroup, optional
        The TP group (default: the default group when torch.distributed is initialized, else this process).
    mem_fraction : float
        Fraction of the device's total memory the process may use, in (0, 1] (vLLM's ``gpu_memory_utilization``):
        KV = mem_fraction x total - torch in use - non-torch - activation peak - headroom.
    profile_fn : callable, optional
        Runs the server's largest forward step; its activation peak is measured on CUDA (unmeasured on CPU).
    kv_dtype, fp8_scales : str
        KV element type: "auto" (the checkpoint's), "fp32", "fp16", "bf16" or "fp8"; fp8's scale layout.
    headroom : int or float
        Memory kept free on top: an ``int`` is bytes, a ``float`` in [0, 1) a fraction of the total.
    tp_rank, tp_size : int, optional
        This shard and the TP degree (default: rank in and size of the group); each tp_rank once per replica.
    device : torch.device or str, optional
        Default: the current CUDA device for an NCCL group or when CUDA can be measured, else the CPU.
    device_memory_bytes, activation_bytes, in_use_bytes : int, optional
        Declared terms in bytes: the total (required on CPU; on CUDA it lowers the measured one), the
        activation peak (on CUDA instead of ``profile_fn``; CPU default 0), memory in use (CPU only, default 0).
    max_batched_tokens, max_seqs : int
        Largest prefill step in tokens (sets the warm-up message and the planner's activation term) and most
        sequences per step (the planner's sampler term).
    gpu : str
        The planner's GPU preset for the prediction (context and interconnect; the total is the measured one).

    Returns
    -------
    PoolSize
        Equal on every rank of the group (``hash_key`` included).

    Raises
    ------
    InvalidArgumentError, RankMismatchError, ProfileError, PlanError, KVPoolError
        A bad argument or duplicate / missing ``tp_rank``; ranks disagreeing on the settings; ``profile_fn``
        failing; no block left; any other failure: on every rank, naming the rank and the cause.
    """
    request = SizeRequest(
        spec=spec, block_size=block_size, mem_fraction=mem_fraction, profile_fn=profile_fn, kv_dtype=kv_dtype,
        headroom=headroom, tp_rank=tp_rank, tp_size=tp_size, device=device, device_memory_bytes=device_memory_bytes,
        activation_bytes=activation_bytes, in_use_bytes=in_use_bytes, fp8_scales=fp8_scales,
        max_batched_tokens=max_batched_tokens, max_seqs=max_seqs,
    )
    grp = _group.resolve_group(group)
    prep, hash_key = exchange_settings(grp, request)
    warmed = warm_up_and_profile(grp, prep, profile_fn)
    ranks, deciding = agree_on_min(grp, prep, warmed)
    size = build_pool_size(prep, ranks, deciding, hash_key, gpu)
    logger.info("%s", size.format_comparison())
    return size


# ----------------------------------------------------------------------------- 1. settings
@dataclasses.dataclass(frozen=True)
class RankSettings:
    """What step 1 sends every rank: the digest and the settings behind it, the ``tp_rank``, and on TP rank 0
    (or a lone process) the 128 random bits keying the prefix cache's block hashes (``None`` elsewhere)."""

    digest: str
    settings: dict
    tp_rank: int
    hash_key: Optional[int]


def exchange_settings(grp: _group.Group, request: SizeRequest) -> tuple[Prepared, int]:
    """Check the arguments on this rank; agree on the settings and ``tp_rank`` s; return the group's hash key.

    One ``all_gather_object`` carries each rank's status (a bad argument on one rank raises on every rank) and,
    on success, its ``RankSettings``.
    """
    prep, everyone = _group.gather_step(
        grp, "checking the arguments of size_kv_pool", errors.InvalidArgumentError,
        lambda: prepare(grp, request), share=lambda p: _rank_settings(grp, p),
    )
    mismatch = _digest.describe_mismatch([dataclasses.asdict(e) for e in everyone], _group.global_ranks(grp))
    if mismatch is not None:
        raise errors.RankMismatchError(mismatch)
    check_tp_ranks([e.tp_rank for e in everyone], prep.args.tp_size)
    return prep, next(e.hash_key for e in everyone if e.hash_key is not None)


def _rank_settings(grp: _group.Group, prep: Prepared) -> RankSettings:
    draws_key = prep.args.tp_rank == 0 or grp.size == 1  # one draw, used by every rank's allocator
    return RankSettings(prep.digest, prep.settings, prep.args.tp_rank, secrets.randbits(128) if draws_key else None)


# ----------------------------------------------------------------------------- 2. warm-up and profile
def warm_up_and_profile(grp: _group.Group, prep: Prepared, profile_fn: Optional[Callable[[], object]]) -> Warmed:
    """NCCL warm-up with the largest message and the snapshot NCCL's share is read from; the activation peak.

    The warm-up message is allocated in a step of its own: a rank short of memory tells the others before
    anyone enters the all-reduce.
    """
    message: list = []
    if grp.backend == "nccl":  # NCCL sets up its buffers on first use: only an NCCL group is warmed up
        message, _ = _group.gather_step(
            grp, "allocating the NCCL warm-up message", errors.KVPoolError,
            lambda: _measure.warm_up_message(grp.device, prep.warmup_bytes, prep.torch_dtype),
        )
    after_comm, _ = _group.gather_step(
        grp, "the NCCL warm-up all-reduce and the memory snapshot after it", errors.KVPoolError,
        lambda: _warm_up_and_snapshot(grp, prep, message),
    )
    activation, _ = _group.gather_step(
        grp, "profile_fn (the server's profile forward)", errors.ProfileError,
        lambda: _activation_peak(prep, profile_fn),
    )
    return Warmed(after_comm, activation)


def _warm_up_and_snapshot(grp: _group.Group, prep: Prepared, message: list) -> Optional[_measure.Snapshot]:
    if message:
        _measure.warm_up_all_reduce(grp.handle, message)
    return _measure.cuda_snapshot(prep.device) if prep.device.type == "cuda" else None


def _activation_peak(prep: Prepared, profile_fn: Optional[Callable[[], object]]) -> int:
    """Measured on CUDA with a ``profile_fn``; declared otherwise (``profile_fn`` still has to run)."""
    on_cuda = prep.device.type == "cuda"
    measured = 0
    if on_cuda and profile_fn is not None:
        measured = _measure.cuda_activation_peak(profile_fn, prep.device)
    else:
        _measure.run_profile(profile_fn)
    if prep.args.activation_bytes is not None:
        return prep.args.activation_bytes
    if on_cuda and profile_fn is None:
        logger.warning(
            "size_kv_pool on %s without profile_fn or activation_bytes: the activation peak is taken as 0, "
            "so the pool may leave no room for the largest forward step", prep.device,
        )
    return measured


# ----------------------------------------------------------------------------- 3. the MIN
def agree_on_min(grp: _group.Group, prep: Prepared, warmed: Warmed) -> tuple[tuple[RankFigures, ...], int]:
    """Every rank's figures (group-rank order) and the deciding rank: the fewest blocks, the lowest on a tie.

    The MIN is taken over the gathered Python ints, which cannot overflow.
    """
    global_rank = _group.global_ranks(grp)[grp.rank]
    _, ranks = _group.gather_step(
        grp, "measuring this rank's memory", errors.KVPoolError,
        lambda: rank_figures(prep, grp, global_rank, warmed), share=lambda figures: figures,
    )
    num_blocks = min(r.num_blocks for r in ranks)
    deciding = min(r.rank for r in ranks if r.num_blocks == num_blocks)
    if num_blocks <= 0:
        raise errors.PlanError(no_block_message(ranks[deciding], prep, grp.size))
    return tuple(ranks), deciding


# ----------------------------------------------------------------------------- 4. the result
def build_pool_size(prep: Prepared, ranks: tuple[RankFigures, ...], deciding: int, hash_key: int,
                    gpu: str) -> PoolSize:
    """The deciding rank's ``PoolSize`` with the planner's prediction for the same settings (the same on every rank)."""
    args, d = prep.args, ranks[deciding]
    predicted, prediction_error = predict(
        prep.spec, tp=args.tp_size, total_bytes=d.total_bytes, mem_fraction=args.mem_fraction,
        headroom_bytes=d.headroom_bytes, kv_dtype=prep.kv_dtype, fp8_scales=args.fp8_scales,
        block_size=args.block_size, max_batched_tokens=args.max_batched_tokens, max_seqs=args.max_seqs, gpu=gpu,
    )
    return PoolSize.from_ranks(
        ranks, deciding, block_size=args.block_size, bytes_per_block=prep.bytes_per_block, tp_size=args.tp_size,
        kv_dtype=prep.kv_dtype, fp8_scales=args.fp8_scales, mem_fraction=args.mem_fraction,
        device=prep.device.type, digest=prep.digest, hash_key=hash_key,
        predicted=predicted, prediction_error=prediction_error,
    )
