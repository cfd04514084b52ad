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

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One rank's checked arguments (canonical types) and what it derived from them.

    ``kv_dtype`` is the resolved KV dtype ("auto" becomes the checkpoint's); ``headroom`` is an
    ``int`` of bytes or a ``float`` fraction in (0, 1); ``first`` is the CUDA snapshot taken before any
    collective (``None`` on the CPU).
    """

    spec: Any
    block_size: int
    tp_size: int
    tp_rank: int
    device: torch.device
    kv_dtype: str
    fp8_scales: str
    mem_fraction: float
    headroom: Union[int, float]
    max_batched_tokens: int
    max_seqs: int
    device_memory_bytes: Optional[int]
    in_use_bytes: int
    activation_bytes: Optional[int]
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


def _check_scalars(grp: Group, block_size, mem_fraction, profile_fn, headroom, tp_rank, tp_size,
                   device_memory_bytes, activation_bytes, in_use_bytes, fp8_scales, max_batched_tokens,
                   max_seqs) -> dict:
    """Every scalar argument checked and in canonical form (plain ``int`` / ``float`` / lower-case ``str``)."""
    if profile_fn is not None and not callable(profile_fn):
        raise errors.InvalidArgumentError(f"profile_fn must be callable (no arguments), got {profile_fn!r}")
    out = dict(
        block_size=_args.as_block_size(block_size),
        mem_fraction=_args.as_mem_fraction(mem_fraction),
        headroom=_args.as_headroom(headroom),
        device_memory_bytes=_args.as_optional_bytes("device_memory_bytes", device_memory_bytes, positive=True),
        activation_bytes=_args.as_optional_bytes("activation_bytes", activation_bytes),
        in_use_bytes=_args.as_optional_bytes("in_use_bytes", in_use_bytes),
        max_batched_tokens=_args.as_int("max_batched_tokens", max_batched_tokens, minimum=1),
        max_seqs=_args.as_int("max_seqs", max_seqs, minimum=1),
        fp8_scales=_args.as_fp8_scales(fp8_scales),
    )
    tp_size = grp.size if tp_size is None else _args.as_int("tp_size", tp_size, minimum=1)
    tp_rank = grp.rank % tp_size if tp_rank is None else _args.as_int("tp_rank", tp_rank, minimum=0)
    if tp_rank >= tp_size:
        raise errors.InvalidArgumentError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank!r}")
    return dict(out, tp_size=tp_size, tp_rank=tp_rank)


def _check_device_terms(dev: torch.device, args: dict, profile_fn) -> None:
    """Which memory terms may be declared depends on whether the device can be measured."""
    if dev.type == "cpu" and args["device_memory_bytes"] is None:
        raise errors.InvalidArgumentError(
            "size_kv_pool on the CPU needs device_memory_bytes= (the memory the pool's device has, in bytes): "
            "memory cannot be measured there; pass e.g. device_memory_bytes=64 * 2**30"
        )
    if dev.type == "cuda" and args["in_use_bytes"] is not None:
        raise errors.InvalidArgumentError(
            "in_use_bytes is for the CPU only: on CUDA torch's memory in use is measured; drop in_use_bytes="
        )
    if dev.type == "cuda" and args["activation_bytes"] is not None and profile_fn is not None:
        raise errors.InvalidArgumentError(
            "on CUDA give either profile_fn (the activation peak is measured) or activation_bytes (declared), not both"
        )


def prepare(spec: Any, grp: Group, *, device: Any, kv_dtype: Any, profile_fn: Optional[Callable[[], object]],
            **scalars: Any) -> Prepared:
    """Check every argument, load the spec, lay out one block, compute the digest, take the first snapshot.

    ``scalars`` are ``size_kv_pool``'s remaining arguments by name (``block_size``, ``mem_fraction``, ...).
    """
    from ..plan.kv import kv_shard_layout
    from ..plan.model import load_model_spec

    args = _check_scalars(grp, profile_fn=profile_fn, **scalars)
    dev = resolve_device(device, grp, args["device_memory_bytes"])
    _check_device_terms(dev, args, profile_fn)

    spec = load_model_spec(spec)
    layout = kv_shard_layout(spec, tp=args["tp_size"], kv_dtype=kv_dtype, fp8_scales=args["fp8_scales"])
    torch_dtype = _TORCH_DTYPES.get(spec.dtype, torch.bfloat16)
    settings = _digest.settings(
        spec, block_size=args["block_size"], kv_dtype=layout.kv_dtype, fp8_scales=args["fp8_scales"],
        tp_size=args["tp_size"], mem_fraction=args["mem_fraction"], headroom=args["headroom"],
        max_batched_tokens=args["max_batched_tokens"], max_seqs=args["max_seqs"],
    )
    first = _measure.cuda_snapshot(dev) if dev.type == "cuda" else None
    if first is not None and args["device_memory_bytes"] is not None and args["device_memory_bytes"] > first.total:
        raise errors.InvalidArgumentError(
            f"device_memory_bytes={args['device_memory_bytes']} is more than {dev} has ({first.total} bytes); "
            "give at most the device's total, or leave it out to use the measured total"
        )
    return Prepared(
        spec=spec, device=dev, kv_dtype=layout.kv_dtype,
        **{**args, "in_use_bytes": args["in_use_bytes"] or 0},
        bytes_per_block=int(layout.bytes_per_block(args["block_size"])),
        torch_dtype=torch_dtype,
        warmup_bytes=args["max_batched_tokens"] * spec.hidden_size * torch.empty((), dtype=torch_dtype).element_size(),
        settings=settings,
        digest=_digest.digest(settings),
        first=first,
    )
