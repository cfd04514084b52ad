"""What one rank measures (CUDA) or is told (CPU) about its device memory.

On CUDA the terms come from the driver and from torch's caching allocator:

- total and free: ``torch.cuda.mem_get_info``;
- torch's own use: ``torch.cuda.memory_allocated`` (weights and anything else the server keeps) and
  ``memory_reserved`` (the allocator's segments, cached free space included);
- non-torch memory (CUDA context, NCCL, cuBLAS/cuDNN handles, other processes on the GPU):
  ``(total - free) - reserved``;
- NCCL's share: non-torch memory after the group's first collectives (the settings exchange and a
  warm-up all-reduce of the largest message the server will send) minus before them;
- the activation peak: ``max_memory_allocated - memory_allocated`` around the server's profile function,
  after ``reset_peak_memory_stats``.

On CPU nothing of this can be measured: the caller declares the device memory (``device_memory_bytes``),
what is already in use (``in_use_bytes``) and the activation peak (``activation_bytes``).
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Device memory at one instant, in bytes."""

    total: int
    free: int
    allocated: int
    reserved: int

    @property
    def non_torch(self) -> int:
        # memory the driver says is used that torch's allocator does not hold
        return max(0, self.total - self.free - self.reserved)


def cuda_snapshot(device: torch.device, release_cache: bool = False) -> Snapshot:
    """Synchronize ``device`` and read its memory; ``release_cache`` first returns torch's cached free blocks."""
    torch.cuda.synchronize(device)
    if release_cache:
        gc.collect()
        torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return Snapshot(
        total=int(total),
        free=int(free),
        allocated=int(torch.cuda.memory_allocated(device)),
        reserved=int(torch.cuda.memory_reserved(device)),
    )


def warm_up_message(device: torch.device, nbytes: int, dtype: torch.dtype) -> list:
    """The warm-up all-reduce's message: ``[nbytes // itemsize]`` zeros of ``dtype`` on ``device``, in a list.

    Allocated apart from the collective, so a rank that cannot allocate it says so before any rank enters
    the all-reduce; the list lets ``warm_up_all_reduce`` drop the last reference.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [torch.zeros(max(1, nbytes // itemsize), dtype=dtype, device=device)]


def warm_up_all_reduce(group_handle, message: list) -> None:
    """One all-reduce of ``message[0]`` over the group, so NCCL sets up what its largest message needs.

    The tensor is freed afterwards (torch keeps it cached, which the snapshot counts as torch's, not NCCL's).
    """
    import torch.distributed as dist

    buf = message.pop()
    dist.all_reduce(buf, group=group_handle)
    if buf.is_cuda:
        torch.cuda.synchronize(buf.device)
    del buf


def cuda_activation_peak(profile_fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes torch allocated on ``device`` during ``profile_fn()`` above what was allocated before it.

    Exceptions from ``profile_fn`` propagate (the caller turns them into ``ProfileError`` on every rank).
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = profile_fn()
    del result  # whatever the forward returned is not kept by the server's steady state
    torch.cuda.synchronize(device)
    return max(0, int(torch.cuda.max_memory_allocated(device)) - int(before))


def run_profile(profile_fn: Optional[Callable[[], object]]) -> None:
    """Run ``profile_fn`` where its memory cannot be measured (CPU): it must still succeed."""
    if profile_fn is not None:
        result = profile_fn()
        del result
