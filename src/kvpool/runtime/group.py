"""The process group a sizing call runs over, and the few collectives it needs.

Everything that crosses ranks goes through ``torch.distributed`` (NCCL on GPUs, gloo on CPU). A rank
that fails locally must still take part in every collective the other ranks enter, or they hang: so
each step that can fail runs through ``gather_step``, which exchanges its status (and its result) over
the group, and every rank raises together. Only ``all_gather_object`` is used: the MIN block count is
taken over the gathered Python ints, which cannot overflow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

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


@dataclasses.dataclass(frozen=True)
class Status:
    """What one rank reports after a step that may fail: ``None`` error means it succeeded."""

    error_type: Optional[str] = None
    message: str = ""

    @classmethod
    def of(cls, exc: Optional[BaseException]) -> "Status":
        if exc is None:
            return cls()
        if isinstance(exc, KeyboardInterrupt):
            return cls(type(exc).__name__, "the process was interrupted (Ctrl-C or SIGINT) and stops there")
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


def gather_step(
    group: Group, step: str, default: type, run: Callable[[], Any], share: Optional[Callable[[Any], Any]] = None,
) -> tuple[Any, list]:
    """Run ``run()`` on this rank, tell every rank how it went, and raise on all of them if it failed on any.

    One ``all_gather_object`` carries each rank's status and, on success, ``share(result)``: a step
    whose result the other ranks need costs no collective beyond the one that shares it.

    Parameters
    ----------
    group : Group
    step : str
        What the step does, for the message ("profile_fn (the server's profile forward)").
    default : type
        The ``KVPoolError`` class raised for a failure that is not a kvpool error.
    run : callable
        The local work; any exception it raises (``KeyboardInterrupt`` included) is exchanged.
    share : callable, optional
        Maps ``run()``'s result to what the other ranks receive (default: nothing, ``None``).

    Returns
    -------
    (object, list)
        This rank's ``run()`` result and every rank's shared value, in group-rank order.

    Raises
    ------
    KVPoolError
        ``default`` (or the failed rank's kvpool error class) on every rank when any rank failed.
    BaseException
        On the rank where ``run()`` was interrupted (``KeyboardInterrupt``, ``SystemExit``): that
        exception itself, re-raised after the other ranks were told.
    """
    exc: Optional[BaseException] = None
    result = shared = None
    try:
        result = run()
        shared = None if share is None else share(result)
    except BaseException as caught:  # noqa: BLE001 - exchanged below so that no peer waits on this rank
        exc = caught
    gathered = all_gather(group, (Status.of(exc), shared))
    if exc is not None and not isinstance(exc, Exception):
        raise exc  # the peers know now; an interrupt stops this process as its user asked
    raise_if_any_failed([status for status, _ in gathered], exc, step, default, global_ranks(group))
    return result, [value for _, value in gathered]


def global_ranks(group: Group) -> list[int]:
    """Global rank of each group rank (for messages)."""
    if not group.distributed:
        return [0]
    return [dist.get_global_rank(group.handle, r) for r in range(group.size)]
