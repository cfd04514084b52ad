"""The reserved virtual range of an elastic pool and the one torch tensor that views it.

``_C.VirtualRange`` (``csrc/vmm.{h,cpp}``) reserves the addresses and maps physical chunks; this module
picks its backend from the cache's device and makes a ``uint8`` tensor spanning the whole range at its fixed
address, without torch headers in the core:

- host backend (``device="cpu"``, the CPU tests): ``torch.frombuffer`` over a ctypes array at the address;
- CUDA backend: ``torch.as_tensor`` of an object exposing ``__cuda_array_interface__``. torch asks the driver
  which device owns the pointer, which an unmapped address cannot answer, so the first chunk is mapped for
  that moment if it is not mapped already.

Either tensor keeps the range alive (the ctypes array / the interface object holds it), so a view that
outlives its cache never points at released addresses. Touching rows whose chunks are not mapped is a
segfault on the host and an illegal address on the GPU: the allocator only hands out mapped block ids.
"""
from __future__ import annotations

import ctypes

import torch

from ..errors import InvalidArgumentError, KVPoolError

_GRANULARITY: dict = {}  # (backend, device index) -> bytes of one chunk


def backend_of(device: torch.device) -> str:
    """``"host"`` for a CPU cache, ``"cuda"`` for a CUDA one; anything else is refused."""
    if device.type == "cpu":
        return "host"
    if device.type == "cuda":
        return "cuda"
    raise InvalidArgumentError(f"device={device} has no elastic backend; use 'cpu' (host backend) or 'cuda'")


def _range_class():
    from .. import _C  # noqa: PLC0415

    cls = getattr(_C, "VirtualRange", None)
    if cls is None:
        raise KVPoolError("this build of kvpool._C has no VirtualRange; rebuild the extension "
                          "(python setup.py build_ext --inplace) from a checkout with csrc/vmm.cpp")
    return cls


def reserve(nbytes: int, device: torch.device):
    """A ``_C.VirtualRange`` of at least ``nbytes`` on ``device``'s backend (nothing mapped yet)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda"
                                                            else 0)
    return _range_class()(int(nbytes), backend_of(device), int(index))


def granularity(device: torch.device) -> int:
    """Bytes of one physical chunk on ``device``'s backend (asked once from a minimal reservation)."""
    key = (backend_of(device), device.index)
    if key not in _GRANULARITY:
        _GRANULARITY[key] = int(reserve(1, device).granularity)
    return _GRANULARITY[key]


class _DeviceBytes:
    """``__cuda_array_interface__`` (v3) of ``nbytes`` bytes at ``ptr``, holding ``owner`` alive."""

    def __init__(self, ptr: int, nbytes: int, owner):
        self._owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def range_tensor(vrange, device: torch.device) -> torch.Tensor:
    """``[vrange.reserved_bytes] uint8`` on ``device`` at ``vrange.ptr``: every region is a view of it."""
    nbytes, ptr = int(vrange.reserved_bytes), int(vrange.ptr)
    if device.type == "cpu":
        array = (ctypes.c_uint8 * nbytes).from_address(ptr)
        array._owner = vrange  # the tensor holds the array, the array the range
        return torch.frombuffer(array, dtype=torch.uint8)
    gran = int(vrange.granularity)
    mapped_here = not vrange.is_mapped(0)
    if mapped_here:
        vrange.map(0, gran)
    try:
        with torch.cuda.device(device):
            tensor = torch.as_tensor(_DeviceBytes(ptr, nbytes, vrange), device=device)
    finally:
        if mapped_here:
            vrange.unmap(0, gran)
    if tensor.data_ptr() != ptr or tensor.device != device:
        raise KVPoolError(f"torch placed the range at {tensor.data_ptr():#x} on {tensor.device}, not {ptr:#x} on "
                          f"{device}")
    return tensor
