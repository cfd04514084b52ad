"""``size_kv_pool``: the call a tensor-parallel server makes on every rank after loading its weights.

Order of the steps (each rank runs the same collectives in the same order, and every step that can
fail on one rank runs through ``group.gather_step``, which exchanges its status, so a failure raises
the same ``KVPoolError`` on every rank instead of hanging):

1. check the arguments (canonical types), load the spec, take the first memory snapshot (before any
   collective, so the NCCL communicator's memory shows up in the difference);
2. exchange the settings digest, the ``tp_rank`` and TP rank 0's random prefix-cache hash key
   (``all_gather_object``): a mismatch raises ``RankMismatchError`` everywhere, duplicate or missing
   ``tp_rank`` values ``InvalidArgumentError`` everywhere;
3. NCCL groups: one warm-up all-reduce of the largest message (``max_batched_tokens x hidden x dtype``);
4. run ``profile_fn`` under ``reset_peak_memory_stats`` (failure: ``ProfileError`` everywhere);
5. measure, compute this rank's block count and gather every rank's figures (``all_gather_object``);
   the pool is the MIN over them;
6. compare with the planner and log the table at INFO on logger ``kvpool.runtime``.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any, Callable, Optional

from .. import errors
from . import digest as _digest
from . import group as _group
from . import measure as _measure
from .pool_size import GiB, PoolSize, RankFigures
from .predict import predict
from .prepare import Prepared, prepare
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

    Call it on every rank of ``group`` (collectively), after the weights are loaded and before the KV
    pool is allocated. Then ``PagedKVCache.for_shard(spec, size.num_blocks, size.block_size, ...)``
    and ``BlockAllocator(size.num_blocks, size.block_size, hash_key=size.hash_key)``.

    Integer arguments take any integer type (numpy integers, anything with ``__index__``) but not
    ``bool`` or ``float``; string settings are case-blind.

    Parameters
    ----------
    spec : ModelSpec or str or path or dict
        The model: a ``ModelSpec`` or anything ``kvpool.load_model_spec`` takes.
    block_size : int
        Tokens per block, a power of two.
    group : ProcessGroup, optional
        The tensor-parallel group. ``None``: the default group when torch.distributed is
        initialized, else this process alone.
    mem_fraction : float
        Fraction of the device's total memory the process may use, in (0, 1] (vLLM's
        ``gpu_memory_utilization``): KV = mem_fraction x total - torch in use - non-torch
        - activation peak - headroom.
    profile_fn : callable, optional
        ``profile_fn()`` runs the server's largest forward step (``max_batched_tokens`` tokens).
        On CUDA its activation peak is measured; on CPU it runs but cannot be measured (give
        ``activation_bytes``). If it raises on any rank, every rank raises ``ProfileError``.
    kv_dtype : {"auto", "fp32", "fp16", "bf16", "fp8"}
        KV element type ("auto": the checkpoint dtype).
    headroom : int or float
        Memory kept free on top of the others: an ``int`` is bytes; a ``float`` in [0, 1) is a
        fraction of the device's total memory.
    tp_rank, tp_size : int, optional
        This rank's shard and the TP degree the pool is laid out for; default the rank in and the
        size of the group. Over a group of more than one rank, each ``tp_rank`` in ``[0, tp_size)``
        must be held by exactly one rank (or by ``k`` ranks when the group spans ``k`` replicas).
    device : torch.device or str, optional
        The device whose memory is sized. Default: the current CUDA device for an NCCL group or
        when CUDA is available and ``device_memory_bytes`` is not given, else the CPU.
    device_memory_bytes : int, optional
        The device's total memory in bytes. Required on CPU; on CUDA it lowers the measured total
        (e.g. to share a GPU).
    activation_bytes : int, optional
        The activation peak in bytes, when it is known instead of measured. On CUDA give either this
        or ``profile_fn``, not both. On CPU default 0.
    in_use_bytes : int, optional
        CPU only: memory already in use on the device (weights, ...), default 0. Measured on CUDA.
    fp8_scales : str
        Scale layout for ``kv_dtype="fp8"`` (see ``kvpool.plan.kv_shard_layout``).
    max_batched_tokens : int
        Largest prefill step in tokens: sets the warm-up all-reduce message
        (``max_batched_tokens x hidden_size x dtype bytes``) and the planner's activation term.
    max_seqs : int
        Most sequences per step: only the planner's prediction uses it (its sampler term).
    gpu : str
        The planner's GPU preset for the prediction (its CUDA-context and interconnect figures); the
        prediction's total memory is always the measured (or declared) one.

    Returns
    -------
    PoolSize
        Equal on every rank of the group (``hash_key`` included).

    Raises
    ------
    InvalidArgumentError
        A bad argument (on every rank when raised on one), or duplicate / missing ``tp_rank`` values.
    RankMismatchError
        The ranks disagree on the model or the settings (on every rank, naming who and what).
    ProfileError
        ``profile_fn`` failed on some rank (on every rank).
    PlanError
        The budget leaves no block on some rank (on every rank, with the figures).
    KVPoolError
        Any other failure on some rank (a CUDA error while measuring, ...): on every rank, naming it.
    KeyboardInterrupt
        On the rank interrupted during the call, after telling the others (which raise a
        ``KVPoolError`` naming that rank; ``ProfileError`` when it happened inside ``profile_fn``).
    """
    grp = _group.resolve_group(group)
    granks = _group.global_ranks(grp)

    # -- 1 + 2. local checks; then the digest, tp_rank and hash key go round (with any failure's status)
    prep, everyone = _group.gather_step(
        grp, "checking the arguments of size_kv_pool", errors.InvalidArgumentError,
        lambda: prepare(
            spec, grp, device=device, kv_dtype=kv_dtype, profile_fn=profile_fn, block_size=block_size,
            mem_fraction=mem_fraction, headroom=headroom, tp_rank=tp_rank, tp_size=tp_size,
            device_memory_bytes=device_memory_bytes, activation_bytes=activation_bytes, in_use_bytes=in_use_bytes,
            fp8_scales=fp8_scales, max_batched_tokens=max_batched_tokens, max_seqs=max_seqs,
        ),
        lambda p: _shared_settings(p, grp),
    )
    mismatch = _digest.describe_mismatch(everyone, granks)
    if mismatch is not None:
        raise errors.RankMismatchError(mismatch)
    check_tp_ranks([e["tp_rank"] for e in everyone], prep.tp_size)
    hash_key = next(e["hash_key"] for e in everyone if e["hash_key"] is not None)

    # -- 3. NCCL warm-up with the largest message (allocated first: a rank short of memory tells the
    #       others before anyone enters the all-reduce), then the snapshot NCCL's share is read from
    message: list = []
    if _needs_warm_up(grp):
        message, _ = _group.gather_step(
            grp, "allocating the NCCL warm-up message", errors.KVPoolError,
            lambda: _measure.warm_up_message(grp.device, prep.warmup_bytes, prep.torch_dtype),
        )
    after_comm, _ = _group.gather_step(
        grp, "the NCCL warm-up all-reduce and the memory snapshot after it", errors.KVPoolError,
        lambda: _warm_up_and_snapshot(grp, prep, message),
    )

    # -- 4. activation peak
    activation, _ = _group.gather_step(
        grp, "profile_fn (the server's profile forward)", errors.ProfileError,
        lambda: _activation_peak(prep, profile_fn),
    )

    # -- 5. every rank's figures; the pool is the smallest block count (Python ints: no overflow)
    _, ranks = _group.gather_step(
        grp, "measuring this rank's memory", errors.KVPoolError,
        lambda: _rank_figures(prep, grp, granks, after_comm, activation), share=lambda figures: figures,
    )
    num_blocks = min(r.num_blocks for r in ranks)
    deciding = min(r.rank for r in ranks if r.num_blocks == num_blocks)
    if num_blocks <= 0:
        raise errors.PlanError(_no_block_message(ranks[deciding], prep, grp.size))

    # -- 6. the plan beside the measurement (deterministic: the same on every rank)
    size = _pool_size(prep, tuple(ranks), deciding, hash_key, gpu)
    logger.info("%s", size.format_comparison())
    return size


# ----------------------------------------------------------------------------- steps
def _shared_settings(prep: Prepared, grp: _group.Group) -> dict:
    """What step 2 sends every rank: the digest and settings, this rank's tp_rank, and (TP rank 0) a hash key."""
    draws_key = prep.tp_rank == 0 or grp.size == 1
    return {
        "digest": prep.digest,
        "settings": prep.settings,
        "tp_rank": prep.tp_rank,
        # 128 random bits keying the prefix cache's block hashes: one draw, used by every rank's allocator
        "hash_key": secrets.randbits(128) if draws_key else None,
    }


def _needs_warm_up(grp: _group.Group) -> bool:
    """NCCL sets up its buffers on first use: only an NCCL group gets the warm-up all-reduce."""
    return grp.backend == "nccl"


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
    if prep.activation_bytes is not None:
        return prep.activation_bytes
    if on_cuda and profile_fn is None:
        logger.warning(
            "size_kv_pool on %s without profile_fn or activation_bytes: the activation peak is taken as 0, "
            "so the pool may leave no room for the largest forward step", prep.device,
        )
    return measured


def _pool_size(prep: Prepared, ranks: tuple, deciding: int, hash_key: int, gpu: str) -> PoolSize:
    d = ranks[deciding]
    num_blocks = d.num_blocks
    predicted, prediction_error = predict(
        prep.spec, tp=prep.tp_size, total_bytes=d.total_bytes, mem_fraction=prep.mem_fraction,
        headroom_bytes=d.headroom_bytes, kv_dtype=prep.kv_dtype, fp8_scales=prep.fp8_scales,
        block_size=prep.block_size, max_batched_tokens=prep.max_batched_tokens, max_seqs=prep.max_seqs, gpu=gpu,
    )
    return PoolSize(
        num_blocks=num_blocks,
        block_size=prep.block_size,
        bytes_per_block=prep.bytes_per_block,
        num_tokens=num_blocks * prep.block_size,
        kv_bytes=num_blocks * prep.bytes_per_block,
        tp_size=prep.tp_size,
        kv_dtype=prep.kv_dtype,
        fp8_scales=prep.fp8_scales,
        mem_fraction=prep.mem_fraction,
        device=prep.device.type,
        measured=d.measured,
        total_bytes=d.total_bytes,
        budget_bytes=d.budget_bytes,
        torch_in_use_bytes=d.torch_in_use_bytes,
        activation_peak_bytes=d.activation_peak_bytes,
        non_torch_bytes=d.non_torch_bytes,
        nccl_bytes=d.nccl_bytes,
        headroom_bytes=d.headroom_bytes,
        kv_budget_bytes=d.kv_budget_bytes,
        deciding_rank=deciding,
        ranks=ranks,
        digest=prep.digest,
        hash_key=hash_key,
        predicted=predicted,
        prediction_error=prediction_error,
    )


def _rank_figures(prep: Prepared, grp, granks, after_comm, activation: int) -> RankFigures:
    """This rank's terms; on CUDA read after the profile with torch's cached blocks released."""
    dev = prep.device
    if dev.type == "cuda":
        last = _measure.cuda_snapshot(dev, release_cache=True)
        total = prep.device_memory_bytes or last.total
        # device_memory_bytes (if given) lowers the total; everything measured still counts in full
        in_use, reserved, non_torch, free = last.allocated, last.reserved, last.non_torch, last.free
        nccl = max(0, after_comm.non_torch - prep.first.non_torch)
        measured = True
    else:
        total = prep.device_memory_bytes
        in_use = reserved = prep.in_use_bytes
        non_torch = nccl = 0
        free = total - in_use
        measured = False
    headroom_bytes = prep.headroom if isinstance(prep.headroom, int) else int(prep.headroom * total)
    budget = int(prep.mem_fraction * total)
    kv_budget = budget - in_use - non_torch - activation - headroom_bytes
    return RankFigures(
        rank=grp.rank,
        global_rank=granks[grp.rank],
        tp_rank=prep.tp_rank,
        device=str(dev),
        measured=measured,
        total_bytes=int(total),
        budget_bytes=budget,
        free_bytes=int(free),
        torch_in_use_bytes=int(in_use),
        torch_reserved_bytes=int(reserved),
        non_torch_bytes=int(non_torch),
        nccl_bytes=int(nccl),
        activation_peak_bytes=int(activation),
        headroom_bytes=headroom_bytes,
        kv_budget_bytes=int(kv_budget),
        num_blocks=max(0, kv_budget) // prep.bytes_per_block,
    )


def _no_block_message(d: RankFigures, prep: Prepared, world: int) -> str:
    def g(x: int) -> str:
        return f"{x / GiB:.2f} GiB"

    short = prep.bytes_per_block - d.kv_budget_bytes
    where = f"rank {d.rank} of {world}" if world > 1 else "this device"
    return (
        f"the memory budget leaves no KV block on {where}: {prep.mem_fraction} x {g(d.total_bytes)} total "
        f"= {g(d.budget_bytes)} budget - {g(d.torch_in_use_bytes)} torch in use (weights) - "
        f"{g(d.non_torch_bytes)} non-torch - {g(d.activation_peak_bytes)} activation peak - "
        f"{g(d.headroom_bytes)} headroom = {g(d.kv_budget_bytes)} for KV, and one block takes "
        f"{prep.bytes_per_block} bytes (short by {short} bytes). Raise mem_fraction, lower headroom or "
        "max_batched_tokens, use more tensor-parallel ranks, kv_dtype='fp8' or a smaller block_size"
    )
