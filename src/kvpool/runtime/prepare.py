"""Step 1 of ``size_kv_pool``, local to each rank: check the arguments, load the spec, take the first snapshot.

Nothing here talks to the other ranks; any error it raises is exchanged by the caller (step 2), so a
bad argument on one rank stops every rank. Every value that enters the settings digest is brought to
its canonical form here (see ``arguments``), so equal settings written differently agree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import torch

from .. import errors
from .._device_check import checked_device
from . import arguments as _args
from . import digest as _digest
from . import measure as _measure
from .group import Group


@dataclasses.dataclass(frozen=True)
class SizeRequest:
    """``size_kv_pool``'s arguments as the caller gave them (unchecked), ``group`` and ``gpu`` aside."""

    spec: Any
    block_size: Any
    mem_fraction: Any
    profile_fn: Optional[Callable[[], object]]
    kv_dtype: Any
    headroom: Any
    tp_rank: Any
    tp_size: Any
    device: Any
    device_memory_bytes: Any
    activation_bytes: Any
    in_use_bytes: Any
    fp8_scales: Any
    max_batched_tokens: Any
    max_seqs: Any


@dataclasses.dataclass(frozen=True)
class Arguments:
    """The scalar arguments, checked and in canonical form (plain ``int`` / ``float`` / lower-case ``str``).

    ``headroom`` is an ``int`` of bytes or a ``float`` fraction in (0, 1); the optional byte counts stay
    ``None`` when not given (which ones may be given depends on the device, see ``_check_device_terms``).
    """

    block_size: int
    mem_fraction: float
    headroom: Union[int, float]
    device_memory_bytes: Optional[int]
    activation_bytes: Optional[int]
    in_use_bytes: Optional[int]
    max_batched_tokens: int
    max_seqs: int
    fp8_scales: str
    tp_size: int
    tp_rank: int


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One rank's checked arguments and what it derived from them before any collective.

    ``kv_dtype`` is the resolved KV dtype ("auto" becomes the checkpoint's); ``settings`` and ``digest``
    are what the ranks compare; ``first`` is the CUDA snapshot taken before any collective (``None`` on
    the CPU).
    """

    args: Arguments
    spec: Any
    device: torch.device
    kv_dtype: str
    bytes_per_block: int
    torch_dtype: torch.dtype
    warmup_bytes: int
    settings: dict
    digest: str
    first: Optional[_measure.Snapshot]


def resolve_device(device: Any, grp: Group, device_memory_bytes: Optional[int]) -> torch.device:
    """The device to size: ``device``, else the NCCL group's, else CUDA when measurable, else the CPU."""
    if device is None:
        if grp.backend == "nccl":
            device = grp.device
        elif device_memory_bytes is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    dev = checked_device(device)  # not a device, or a CUDA device that is not visible: one clear line
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type not in ("cuda", "cpu"):
        raise errors.InvalidArgumentError(f"device={dev} is not supported; size a 'cuda' or a 'cpu' device")
    return dev


def check_arguments(grp: Group, r: SizeRequest) -> Arguments:
    """Every scalar argument of ``r`` checked and in canonical form."""
    if r.profile_fn is not None and not callable(r.profile_fn):
        raise errors.InvalidArgumentError(f"profile_fn must be callable (no arguments), got {r.profile_fn!r}")
    checked = dict(
        block_size=_args.as_block_size(r.block_size),
        mem_fraction=_args.as_mem_fraction(r.mem_fraction),
        headroom=_args.as_headroom(r.headroom),
        device_memory_bytes=_args.as_optional_bytes("device_memory_bytes", r.device_memory_bytes, positive=True),
        activation_bytes=_args.as_optional_bytes("activation_bytes", r.activation_bytes),
        in_use_bytes=_args.as_optional_bytes("in_use_bytes", r.in_use_bytes),
        max_batched_tokens=_args.as_int("max_batched_tokens", r.max_batched_tokens, minimum=1),
        max_seqs=_args.as_int("max_seqs", r.max_seqs, minimum=1),
        fp8_scales=_args.as_fp8_scales(r.fp8_scales),
    )
    tp_size = grp.size if r.tp_size is None else _args.as_int("tp_size", r.tp_size, minimum=1)
    tp_rank = grp.rank % tp_size if r.tp_rank is None else _args.as_int("tp_rank", r.tp_rank, minimum=0)
    if tp_rank >= tp_size:
        raise errors.InvalidArgumentError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank!r}")
    return Arguments(**checked, tp_size=tp_size, tp_rank=tp_rank)


def _check_device_terms(dev: torch.device, args: Arguments, profile_fn) -> None:
    """Which memory terms may be declared depends on whether the device can be measured."""
    if dev.type == "cpu" and args.device_memory_bytes is None:
        raise errors.InvalidArgumentError(
            "size_kv_pool on the CPU needs device_memory_bytes= (the memory the pool's device has, in bytes): "
            "memory cannot be measured there; pass e.g. device_memory_bytes=64 * 2**30"
        )
    if dev.type == "cuda" and args.in_use_bytes is not None:
        raise errors.InvalidArgumentError(
            "in_use_bytes is for the CPU only: on CUDA torch's memory in use is measured; drop in_use_bytes="
        )
    if dev.type == "cuda" and args.activation_bytes is not None and profile_fn is not None:
        raise errors.InvalidArgumentError(
            "on CUDA give either profile_fn (the activation peak is measured) or activation_bytes (declared), not both"
        )


def _first_snapshot(dev: torch.device, args: Arguments) -> Optional[_measure.Snapshot]:
    """CUDA: memory before any collective (so NCCL's share shows in the next difference); ``None`` on the CPU."""
    if dev.type != "cuda":
        return None
    first = _measure.cuda_snapshot(dev)
    if args.device_memory_bytes is not None and args.device_memory_bytes > first.total:
        raise errors.InvalidArgumentError(
            f"device_memory_bytes={args.device_memory_bytes} is more than {dev} has ({first.total} bytes); "
            "give at most the device's total, or leave it out to use the measured total"
        )
    return first


def _activation_dtype(spec: Any) -> torch.dtype:
    """The warm-up message's dtype: the checkpoint's when activations may run in it, else bf16."""
    from ..plan.dtypes import SERVING_DTYPE_NAMES, find_dtype, torch_dtype_name

    name = find_dtype(spec.dtype)
    return getattr(torch, torch_dtype_name(name)) if name in SERVING_DTYPE_NAMES else torch.bfloat16


def prepare(grp: Group, request: SizeRequest) -> Prepared:
    """Check every argument, load the spec, lay out one block, compute the digest, take the first snapshot."""
    from ..plan.kv import kv_shard_layout
    from ..plan.model import load_model_spec

    args = check_arguments(grp, request)
    dev = resolve_device(request.device, grp, args.device_memory_bytes)
    _check_device_terms(dev, args, request.profile_fn)

    spec = load_model_spec(request.spec)
    layout = kv_shard_layout(spec, tp=args.tp_size, kv_dtype=request.kv_dtype, fp8_scales=args.fp8_scales)
    torch_dtype = _activation_dtype(spec)
    settings = _digest.settings(
        spec, block_size=args.block_size, kv_dtype=layout.kv_dtype, fp8_scales=args.fp8_scales,
        tp_size=args.tp_size, mem_fraction=args.mem_fraction, headroom=args.headroom,
        max_batched_tokens=args.max_batched_tokens, max_seqs=args.max_seqs,
    )
    return Prepared(
        args=args, spec=spec, device=dev, kv_dtype=layout.kv_dtype,
        bytes_per_block=int(layout.pool_bytes_per_block(args.block_size)),  # what PagedKVCache holds
        torch_dtype=torch_dtype,
        warmup_bytes=args.max_batched_tokens * spec.hidden_size * torch_dtype.itemsize,
        settings=settings,
        digest=_digest.digest(settings),
        first=_first_snapshot(dev, args),
    )
