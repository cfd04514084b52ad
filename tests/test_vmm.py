"""The VMM layer ``kvpool._C.VirtualRange`` (issue 16, items 1 and 5): reserve, map, unmap, sleep and
wake, on the host backend (mmap) everywhere and on the CUDA backend where a GPU is present: the
same tests, the same semantics.
"""
import ctypes
import os

import pytest
import torch

from kvpool import _C
from kvpool.errors import ElasticUnavailableError, InvalidArgumentError, KVPoolError, VirtualMemoryError

MiB = 1 << 20
BACKENDS = [
    "host",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


class _CudaBytes:
    """``__cuda_array_interface__`` of ``nbytes`` uint8 at ``ptr``, for torch.as_tensor."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def view(r, offset: int, nbytes: int) -> torch.Tensor:
    """``[nbytes] uint8`` tensor over the range's bytes ``[offset, offset + nbytes)`` (must be mapped)."""
    if r.backend == "host":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(r.ptr + offset), dtype=torch.uint8)
    return torch.as_tensor(_CudaBytes(r.ptr + offset, nbytes), device="cuda")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_reserve_rounds_up_and_maps_nothing(backend):
    r = _C.VirtualRange(5 * MiB, backend=backend)
    g = r.granularity
    assert g >= 2 * MiB and g % (2 * MiB) == 0
    if backend == "host":
        assert g == 2 * MiB  # the same arithmetic as CUDA's usual granularity
    assert r.reserved_bytes == -(-5 * MiB // g) * g
    assert r.ptr % g == 0 and r.ptr != 0
    assert r.mapped_bytes == 0 and not r.asleep and r.backend == backend
    assert not any(r.is_mapped(off) for off in range(0, r.reserved_bytes, g))


def test_map_write_read_back_and_stable_address(backend):
    r = _C.VirtualRange(8 * MiB, backend=backend)
    g, ptr = r.granularity, r.ptr
    r.map(0, g)
    first = view(r, 0, g)
    first[:16] = torch.arange(16, dtype=torch.uint8)
    r.map(g, g)  # growing: the first chunk keeps its address and its bytes
    assert r.ptr == ptr and r.mapped_bytes == 2 * g
    assert first[:16].tolist() == list(range(16))
    view(r, g, g)[-1] = 99
    assert view(r, 0, 2 * g)[2 * g - 1].item() == 99  # two chunks read as one contiguous range
    assert r.is_mapped(g + 12345)
    assert r.reserved_bytes == 2 * g or not r.is_mapped(r.reserved_bytes - 1)


def test_unmap_drops_contents_and_remap_is_zero_filled(backend):
    r = _C.VirtualRange(4 * MiB, backend=backend)
    g = r.granularity
    r.map(0, g)
    view(r, 0, g).fill_(7)
    r.unmap(0, g)
    assert r.mapped_bytes == 0 and not r.is_mapped(0)
    r.map(0, g)
    if backend == "host":  # CUDA gives no zero-fill guarantee
        assert int(view(r, 0, g).sum()) == 0


def test_misaligned_outside_and_negative_are_refused_with_state_unchanged(backend):
    r = _C.VirtualRange(4 * MiB, backend=backend)
    g, end = r.granularity, r.reserved_bytes
    r.map(0, g)
    bad = [(1, g), (0, g + 1), (-g, g), (0, -g), (end, g), (end - g, 2 * g), (2**62, g)]
    for offset, nbytes in bad:
        for fn in (r.map, r.unmap):
            with pytest.raises(InvalidArgumentError) as err:
                fn(offset, nbytes)
            assert str(offset) in str(err.value) or str(nbytes) in str(err.value)
    assert r.mapped_bytes == g and r.is_mapped(0)
    for offset in (-1, end):
        with pytest.raises(InvalidArgumentError, match="outside the reserved range"):
            r.is_mapped(offset)


def test_double_map_and_unmap_of_unmapped_are_refused_all_or_nothing(backend):
    r = _C.VirtualRange(8 * MiB, backend=backend)
    g = r.granularity
    r.map(g, g)
    view(r, g, g)[0] = 5
    with pytest.raises(InvalidArgumentError, match=f"offset {g} is mapped already"):
        r.map(0, 2 * g)  # chunk 0 is free, chunk 1 is not: nothing may be mapped
    assert not r.is_mapped(0) and r.mapped_bytes == g
    with pytest.raises(InvalidArgumentError, match="offset 0 is not mapped"):
        r.unmap(0, 2 * g)
    assert r.is_mapped(g) and view(r, g, 1).item() == 5  # the mapped chunk kept its contents
    r.map(0, 0)  # an empty request is a no-op
    r.unmap(g, 0)
    assert r.mapped_bytes == g


def test_sleep_and_wake_keep_the_addresses_and_the_mapped_set(backend):
    r = _C.VirtualRange(10 * MiB, backend=backend)
    g, ptr = r.granularity, r.ptr
    r.map(0, g)
    if r.reserved_bytes >= 3 * g:
        r.map(2 * g, g)  # a hole at chunk 1 must stay a hole after wake
    before = [r.is_mapped(off) for off in range(0, r.reserved_bytes, g)]
    mapped = r.mapped_bytes
    r.release_all()
    assert r.asleep and r.mapped_bytes == 0 and r.prepared_bytes == 0
    for call in (lambda: r.map(0, g), lambda: r.unmap(0, g), r.release_all, lambda: r.prepare(g)):
        with pytest.raises(InvalidArgumentError, match="asleep"):
            call()
    r.remap_all()
    assert not r.asleep and r.ptr == ptr and r.mapped_bytes == mapped
    assert [r.is_mapped(off) for off in range(0, r.reserved_bytes, g)] == before
    view(r, 0, g).fill_(1)  # writable again
    with pytest.raises(InvalidArgumentError, match="awake"):
        r.remap_all()


def test_prepare_makes_chunks_ahead_and_map_uses_them(backend):
    r = _C.VirtualRange(8 * MiB, backend=backend)
    g = r.granularity
    r.prepare(g + 1)  # rounded up to whole chunks
    assert r.prepared_bytes == 2 * g and r.mapped_bytes == 0
    r.map(0, g)
    assert r.prepared_bytes == g and r.mapped_bytes == g
    with pytest.raises(InvalidArgumentError, match="unmapped bytes"):
        r.prepare(r.reserved_bytes)
    r.drop_prepared()
    assert r.prepared_bytes == 0
    r.prepare(g)
    r.release_all()  # sleep frees prepared memory too
    assert r.prepared_bytes == 0
    with pytest.raises(InvalidArgumentError):
        _C.VirtualRange(4 * MiB, backend=backend).prepare(-1)


def test_constructor_errors():
    for nbytes in (0, -1):
        with pytest.raises(InvalidArgumentError, match=f"nbytes={nbytes}"):
            _C.VirtualRange(nbytes)
    with pytest.raises(InvalidArgumentError, match="'host' or 'cuda'"):
        _C.VirtualRange(MiB, backend="rocm")
    with pytest.raises(InvalidArgumentError, match="device=-1"):
        _C.VirtualRange(MiB, backend="host", device=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the driver is present: the missing-driver error cannot occur")
def test_cuda_backend_without_driver_says_why_and_what_to_do():
    with pytest.raises(ElasticUnavailableError) as err:
        _C.VirtualRange(4 * MiB, backend="cuda")
    message = str(err.value)
    assert "libcuda.so.1" in message and "backend='host'" in message and "static PagedKVCache" in message
    assert isinstance(err.value, VirtualMemoryError) and isinstance(err.value, KVPoolError)


def test_huge_reservation_reserves_address_space_only():
    r = _C.VirtualRange(1 << 40)  # 1 TiB of addresses, no memory (MAP_NORESERVE)
    r.map(r.reserved_bytes - r.granularity, r.granularity)
    view(r, r.reserved_bytes - 1, 1)[0] = 3
    assert r.mapped_bytes == r.granularity



def test_larger_chunks_are_the_unit_of_map_and_unmap(backend):
    probe = _C.VirtualRange(1, backend=backend)
    dg = probe.device_granularity
    r = _C.VirtualRange(10 * dg, backend=backend, chunk_bytes=4 * dg)  # fewer, larger physical allocations
    assert r.granularity == 4 * dg and r.device_granularity == dg
    assert r.reserved_bytes == 12 * dg  # rounded up to whole chunks
    with pytest.raises(InvalidArgumentError, match="multiples of the granularity"):
        r.map(0, dg)
    r.map(4 * dg, 8 * dg)
    view(r, 4 * dg, 8 * dg)[-1] = 9
    assert r.mapped_bytes == 8 * dg and r.is_mapped(5 * dg) and not r.is_mapped(3 * dg)
    r.unmap(8 * dg, 4 * dg)
    assert r.mapped_bytes == 4 * dg
    r.release_all()
    r.remap_all()
    assert r.mapped_bytes == 4 * dg and r.is_mapped(4 * dg)
    for bad in (dg + dg // 2, -dg):
        with pytest.raises(InvalidArgumentError, match="chunk_bytes"):
            _C.VirtualRange(8 * dg, backend=backend, chunk_bytes=bad)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_destruction_frees_the_mappings_and_the_reservation():
    def spans():
        with open("/proc/self/maps") as f:
            return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]

    r = _C.VirtualRange(8 * MiB)
    r.map(2 * MiB, 4 * MiB)
    base, end = r.ptr, r.ptr + r.reserved_bytes
    assert any(lo < end and hi > base for lo, hi in spans())  # reserved (PROT_NONE) and mapped pages
    del r
    assert not any(lo < end and hi > base for lo, hi in spans())  # nothing of the range is left
