"""The process group a sizing call runs over, and the few collectives it needs.

Everything that crosses ranks goes through ``torch.distributed`` (NCCL on GPUs, gloo on CPU). A rank
that fails locally must still take part in every collective the other ranks enter, or they hang: so
each step that can fail exchanges a status over the group, and every rank raises together.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .. import errors


@dataclasses.dataclass(frozen=True)
class Group:
    """The ranks that must agree on one block count.

    Attributes
    ----------
    handle : ProcessGroup or None
        The torch.distributed group, or ``None`` for a single process without torch.distributed.
    rank : int
        This process's rank inside the group.
    size : int
        Number of ranks in the group.
    device : torch.device
        Where collective tensors live (``cuda`` for NCCL, ``cpu`` for gloo).
    backend : str
        ``"nccl"``, ``"gloo"``, ... or ``"none"`` for a single process.
    """

    handle: Any
    rank: int
    size: int
    device: torch.device
    backend: str

    @property
    def distributed(self) -> bool:
        return self.handle is not None


def resolve_group(group: Any = None) -> Group:
    """The group to size over: ``group``, else the default group when initialized, else this process alone."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return Group(None, 0, 1, torch.device("cpu"), "none")
    if not (dist.is_available() and dist.is_initialized()):
        raise errors.InvalidArgumentError(
            f"group={group!r} was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first, or pass group=None for a single process"
        )
    handle = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(handle)
    if rank < 0:
        raise errors.InvalidArgumentError(
            f"this process (global rank {dist.get_rank()}) is not a member of the group passed as group=; "
            "call size_kv_pool only on the ranks of that group"
        )
    backend = str(dist.get_backend(handle)).lower()
    # NCCL moves only CUDA tensors; every other backend here is used with CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(handle, rank, dist.get_world_size(handle), device, backend)


def all_gather(group: Group, obj: Any) -> list:
    """Every rank's ``obj``, in group-rank order (``all_gather_object``); ``[obj]`` for a single process."""
    if not group.distributed:
        return [obj]
    out: list = [None] * group.size
    dist.all_gather_object(out, obj, group=group.handle)
    return out


def all_reduce_min(group: Group, value: int) -> int:
    """The smallest ``value`` over the group (``all_reduce(op=ReduceOp.MIN)`` on an int64 tensor)."""
    if not group.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.handle)
    return int(t.item())


@dataclasses.dataclass(frozen=True)
class Status:
    """What one rank reports after a step that may fail: ``None`` error means it succeeded."""

    error_type: Optional[str] = None
    message: str = ""

    @classmethod
    def of(cls, exc: Optional[BaseException]) -> "Status":
        if exc is None:
            return cls()
        return cls(type(exc).__name__, str(exc) or repr(exc))


def _error_class(name: Optional[str], default: type) -> type:
    cls = getattr(errors, name or "", None)
    return cls if isinstance(cls, type) and issubclass(cls, errors.KVPoolError) else default


def raise_if_any_failed(
    statuses: Sequence[Status],
    own_error: Optional[BaseException],
    step: str,
    default: type = errors.KVPoolError,
    global_ranks: Optional[Sequence[int]] = None,
) -> None:
    """Raise on every rank when any rank's step failed (call after exchanging ``Status`` over the group).

    A kvpool error keeps its class on every rank (an ``InvalidArgumentError`` on rank 1 is an
    ``InvalidArgumentError`` on rank 0 too); anything else becomes ``default``. The message names
    every failed rank and what it said. The failing rank chains its own exception as the cause.
    """
    failed = [(r, s) for r, s in enumerate(statuses) if s.error_type is not None]
    if not failed:
        return
    first_rank, first = failed[0]
    cls = _error_class(first.error_type, default)

    def name(r: int) -> str:
        if global_ranks is not None and global_ranks[r] != r:
            return f"rank {r} (global rank {global_ranks[r]})"
        return f"rank {r}"

    lines = "; ".join(f"{name(r)}: {s.error_type}: {s.message}" for r, s in failed)
    msg = f"{step} failed on {len(failed)} of {len(statuses)} rank(s), so every rank stops: {lines}"
    raise cls(msg) from own_error


def exchange_status(group: Group, exc: Optional[BaseException], step: str, default: type) -> None:
    """Tell every rank whether this rank's ``step`` failed, and raise on all of them if any did."""
    statuses = all_gather(group, Status.of(exc))
    raise_if_any_failed(statuses, exc, step, default, global_ranks(group))


def global_ranks(group: Group) -> list[int]:
    """Global rank of each group rank (for messages)."""
    if not group.distributed:
        return [0]
    return [dist.get_global_rank(group.handle, r) for r in range(group.size)]
