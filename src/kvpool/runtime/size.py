"""``size_kv_pool``: the call a tensor-parallel server makes on every rank after loading its weights.

Order of the steps (each rank runs the same collectives in the same order, and every step that can
fail on one rank exchanges a status first, so a failure raises on every rank instead of hanging):

1. check the arguments, load the spec, take the first memory snapshot (before any collective, so the
   NCCL communicator's memory shows up in the difference);
2. exchange the settings digest (``all_gather_object``): any mismatch raises ``RankMismatchError`` everywhere;
3. NCCL groups: one warm-up all-reduce of the largest message (``max_batched_tokens x hidden x dtype``);
4. run ``profile_fn`` under ``reset_peak_memory_stats`` (failure: ``ProfileError`` everywhere);
5. measure, compute this rank's block count, take the MIN over the group (``all_reduce(op=MIN)``)
   and gather every rank's figures (``all_gather_object``);
6. compare with the planner and log the table at INFO on logger ``kvpool.runtime``.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Optional

import torch

from .. import errors
from . import digest as _digest
from . import group as _group
from . import measure as _measure
from .pool_size import GiB, PoolSize, RankFigures
from .predict import predict

logger = logging.getLogger("kvpool.runtime")

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    and ``BlockAllocator(size.num_blocks, size.block_size)``.

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
        size of the group.
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
        Equal on every rank of the group.

    Raises
    ------
    InvalidArgumentError
        A bad argument (on every rank when raised on one).
    RankMismatchError
        The ranks disagree on the model or the settings (on every rank, naming who and what).
    ProfileError
        ``profile_fn`` failed on some rank (on every rank).
    PlanError
        The budget leaves no block on some rank (on every rank, with the figures).
    """
    grp = _group.resolve_group(group)
    granks = _group.global_ranks(grp)

    # -- 1. local preparation: any failure is exchanged in step 2 so no rank waits forever
    prep_error: Optional[BaseException] = None
    prep: dict = {}
    try:
        prep = _prepare(
            spec, block_size, grp, mem_fraction, profile_fn, kv_dtype, headroom, tp_rank, tp_size,
            device, device_memory_bytes, activation_bytes, in_use_bytes, fp8_scales, max_batched_tokens, max_seqs,
        )
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        prep_error = exc

    # -- 2. settings digest
    mine = {
        "status": _group.Status.of(prep_error),
        "digest": prep.get("digest", ""),
        "settings": prep.get("settings", {}),
    }
    everyone = _group.all_gather(grp, mine)
    _group.raise_if_any_failed(
        [e["status"] for e in everyone], prep_error, "checking the arguments of size_kv_pool",
        errors.InvalidArgumentError, granks,
    )
    mismatch = _digest.describe_mismatch(everyone, granks)
    if mismatch is not None:
        raise errors.RankMismatchError(mismatch)

    dev: torch.device = prep["device"]
    on_cuda = dev.type == "cuda"

    # -- 3. NCCL warm-up with the largest message
    if grp.backend == "nccl":
        err = None
        try:
            _measure.warm_up_all_reduce(grp.handle, grp.device, prep["warmup_bytes"], prep["torch_dtype"])
        except Exception as exc:  # noqa: BLE001 - an error here is local (the collective itself either runs everywhere or hangs)
            err = exc
        _group.exchange_status(grp, err, "the NCCL warm-up all-reduce", errors.KVPoolError)
    after_comm = _measure.cuda_snapshot(dev) if on_cuda else None

    # -- 4. activation peak
    err = None
    activation = 0
    try:
        if on_cuda and profile_fn is not None:
            activation = _measure.cuda_activation_peak(profile_fn, dev)
        else:
            _measure.run_profile(profile_fn)
    except Exception as exc:  # noqa: BLE001 - re-raised as ProfileError on every rank
        err = exc
    _group.exchange_status(grp, err, "profile_fn (the server's profile forward)", errors.ProfileError)
    if activation_bytes is not None:
        activation = int(activation_bytes)
    elif on_cuda and profile_fn is None:
        logger.warning(
            "size_kv_pool on %s without profile_fn or activation_bytes: the activation peak is taken as 0, "
            "so the pool may leave no room for the largest forward step", dev,
        )

    # -- 5. this rank's figures, the MIN over the group, everyone's figures
    own = _rank_figures(prep, grp, granks, dev, after_comm, activation)
    num_blocks = _group.all_reduce_min(grp, own.num_blocks)
    ranks = tuple(_group.all_gather(grp, own))
    deciding = min(r.rank for r in ranks if r.num_blocks == num_blocks)
    if num_blocks <= 0:
        raise errors.PlanError(_no_block_message(ranks[deciding], prep, grp.size))

    # -- 6. the plan beside the measurement (deterministic: the same on every rank)
    d = ranks[deciding]
    predicted, prediction_error = predict(
        prep["spec"], tp=prep["tp_size"], total_bytes=d.total_bytes, mem_fraction=float(mem_fraction),
        headroom_bytes=d.headroom_bytes, kv_dtype=kv_dtype, fp8_scales=fp8_scales, block_size=block_size,
        max_batched_tokens=max_batched_tokens, max_seqs=max_seqs, gpu=gpu,
    )
    size = PoolSize(
        num_blocks=num_blocks,
        block_size=block_size,
        bytes_per_block=prep["bytes_per_block"],
        num_tokens=num_blocks * block_size,
        kv_bytes=num_blocks * prep["bytes_per_block"],
        tp_size=prep["tp_size"],
        kv_dtype=kv_dtype,
        fp8_scales=fp8_scales,
        mem_fraction=float(mem_fraction),
        device=dev.type,
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
        digest=prep["digest"],
        predicted=predicted,
        prediction_error=prediction_error,
    )
    logger.info("%s", size.format_comparison())
    return size


# ----------------------------------------------------------------------------- helpers
def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_nonneg_int(name: str, value: Any, positive: bool = False) -> None:
    if value is None:
        return
    if not _is_int(value) or value < (1 if positive else 0):
        need = "a positive" if positive else "a non-negative"
        raise errors.InvalidArgumentError(f"{name} must be {need} integer number of bytes, got {value!r}")


def _resolve_device(device: Any, grp: _group.Group, device_memory_bytes: Optional[int]) -> torch.device:
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise errors.InvalidArgumentError(f"device={device!r} is not a torch device ({exc}); pass 'cuda', 'cuda:1' or 'cpu'")
    elif grp.backend == "nccl":
        dev = grp.device
    elif device_memory_bytes is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise errors.InvalidArgumentError(
                f"device={dev} but CUDA is not available here; pass device='cpu' with device_memory_bytes="
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise errors.InvalidArgumentError(f"device={dev} is not supported; size a 'cuda' or a 'cpu' device")
    return dev


def _prepare(spec, block_size, grp, mem_fraction, profile_fn, kv_dtype, headroom, tp_rank, tp_size,
             device, device_memory_bytes, activation_bytes, in_use_bytes, fp8_scales, max_batched_tokens,
             max_seqs) -> dict:
    """Validate the arguments, load the spec, compute the layout and digest, take the first snapshot."""
    from ..plan.model import load_model_spec
    from ..plan.kv import kv_shard_layout

    if not _is_int(block_size) or block_size <= 0 or block_size & (block_size - 1):
        raise errors.InvalidArgumentError(f"block_size must be a positive power of two, got {block_size!r}")
    if isinstance(mem_fraction, bool) or not isinstance(mem_fraction, numbers.Real) or not 0 < mem_fraction <= 1:
        raise errors.InvalidArgumentError(f"mem_fraction must be in (0, 1], got {mem_fraction!r}")
    if profile_fn is not None and not callable(profile_fn):
        raise errors.InvalidArgumentError(f"profile_fn must be callable (no arguments), got {profile_fn!r}")
    if isinstance(headroom, bool) or not isinstance(headroom, numbers.Real) or headroom < 0 or (
        not _is_int(headroom) and headroom >= 1
    ):
        raise errors.InvalidArgumentError(
            f"headroom must be an int number of bytes >= 0 or a float fraction of total memory in [0, 1), got {headroom!r}"
        )
    _check_nonneg_int("device_memory_bytes", device_memory_bytes, positive=True)
    _check_nonneg_int("activation_bytes", activation_bytes)
    _check_nonneg_int("in_use_bytes", in_use_bytes)
    for name, value in (("max_batched_tokens", max_batched_tokens), ("max_seqs", max_seqs)):
        if not _is_int(value) or value <= 0:
            raise errors.InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    if tp_size is None:
        tp_size = grp.size
    if not _is_int(tp_size) or tp_size <= 0:
        raise errors.InvalidArgumentError(f"tp_size must be a positive integer, got {tp_size!r}")
    if tp_rank is None:
        tp_rank = grp.rank % tp_size
    if not _is_int(tp_rank) or not 0 <= tp_rank < tp_size:
        raise errors.InvalidArgumentError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank!r}")

    dev = _resolve_device(device, grp, device_memory_bytes)
    if dev.type == "cpu" and device_memory_bytes is None:
        raise errors.InvalidArgumentError(
            "size_kv_pool on the CPU needs device_memory_bytes= (the memory the pool's device has, in bytes): "
            "memory cannot be measured there; pass e.g. device_memory_bytes=64 * 2**30"
        )
    if dev.type == "cuda" and in_use_bytes is not None:
        raise errors.InvalidArgumentError(
            "in_use_bytes is for the CPU only: on CUDA torch's memory in use is measured; drop in_use_bytes="
        )
    if dev.type == "cuda" and activation_bytes is not None and profile_fn is not None:
        raise errors.InvalidArgumentError(
            "on CUDA give either profile_fn (the activation peak is measured) or activation_bytes (declared), not both"
        )

    spec = load_model_spec(spec)
    layout = kv_shard_layout(spec, tp=tp_size, kv_dtype=kv_dtype, fp8_scales=fp8_scales)
    bytes_per_block = int(layout.bytes_per_block(block_size))
    torch_dtype = _TORCH_DTYPES.get(spec.dtype, torch.bfloat16)
    dtype_bytes = torch.empty((), dtype=torch_dtype).element_size()

    settings = _digest.settings(
        spec, block_size=block_size, kv_dtype=kv_dtype, fp8_scales=fp8_scales, tp_size=tp_size,
        mem_fraction=float(mem_fraction), headroom=headroom, max_batched_tokens=max_batched_tokens,
        max_seqs=max_seqs,
    )
    first = _measure.cuda_snapshot(dev) if dev.type == "cuda" else None
    if first is not None and device_memory_bytes is not None and device_memory_bytes > first.total:
        raise errors.InvalidArgumentError(
            f"device_memory_bytes={device_memory_bytes} is more than {dev} has ({first.total} bytes); "
            "give at most the device's total, or leave it out to use the measured total"
        )
    return {
        "spec": spec,
        "tp_size": tp_size,
        "tp_rank": tp_rank,
        "device": dev,
        "bytes_per_block": bytes_per_block,
        "torch_dtype": torch_dtype,
        "warmup_bytes": max_batched_tokens * spec.hidden_size * dtype_bytes,
        "settings": settings,
        "digest": _digest.digest(settings),
        "first": first,
        "device_memory_bytes": device_memory_bytes,
        "in_use_bytes": in_use_bytes or 0,
        "headroom": headroom,
        "mem_fraction": float(mem_fraction),
    }


def _rank_figures(prep, grp, granks, dev, after_comm, activation) -> RankFigures:
    """This rank's terms; on CUDA read after the profile with torch's cached blocks released."""
    if dev.type == "cuda":
        last = _measure.cuda_snapshot(dev, release_cache=True)
        total = prep["device_memory_bytes"] or last.total
        # device_memory_bytes (if given) lowers the total; everything measured still counts in full
        in_use, reserved, non_torch, free = last.allocated, last.reserved, last.non_torch, last.free
        nccl = max(0, after_comm.non_torch - prep["first"].non_torch)
        measured = True
    else:
        total = prep["device_memory_bytes"]
        in_use = reserved = prep["in_use_bytes"]
        non_torch = nccl = 0
        free = total - in_use
        measured = False
    headroom = prep["headroom"]
    headroom_bytes = int(headroom) if _is_int(headroom) else int(headroom * total)
    budget = int(prep["mem_fraction"] * total)
    kv_budget = budget - in_use - non_torch - activation - headroom_bytes
    return RankFigures(
        rank=grp.rank,
        global_rank=granks[grp.rank],
        tp_rank=prep["tp_rank"],
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
        num_blocks=max(0, kv_budget) // prep["bytes_per_block"],
    )


def _no_block_message(d: RankFigures, prep: dict, world: int) -> str:
    def g(x: int) -> str:
        return f"{x / GiB:.2f} GiB"

    short = prep["bytes_per_block"] - d.kv_budget_bytes
    where = f"rank {d.rank} of {world}" if world > 1 else "this device"
    return (
        f"the memory budget leaves no KV block on {where}: {prep['mem_fraction']} x {g(d.total_bytes)} total "
        f"= {g(d.budget_bytes)} budget - {g(d.torch_in_use_bytes)} torch in use (weights) - "
        f"{g(d.non_torch_bytes)} non-torch - {g(d.activation_peak_bytes)} activation peak - "
        f"{g(d.headroom_bytes)} headroom = {g(d.kv_budget_bytes)} for KV, and one block takes "
        f"{prep['bytes_per_block']} bytes (short by {short} bytes). Raise mem_fraction, lower headroom or "
        "max_batched_tokens, use more tensor-parallel ranks, kv_dtype='fp8' or a smaller block_size"
    )
