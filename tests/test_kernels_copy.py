"""copy_blocks (Triton) against its torch reference: all layers of one allocation, fp8 scales, HND views."""
import numpy as np
import pytest
import torch
from kernels_util import DEVICES, FP8, INTERPRET, device_cases, same_bits
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.errors import BlockIndexError, KernelError
from kvpool.kernels import copy_blocks, reference


def _one_allocation(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device, gen, scales):
    """Every layer's K and V (and fp8 scales) as views of ONE buffer, like PagedKVCache builds them."""
    page = num_blocks * block_size * kv_heads * head_dim
    buf = torch.randint(0, 120, (2 * num_layers * page,), generator=gen, dtype=torch.uint8)
    pages = buf.to(device).view(dtype) if dtype == FP8 else torch.randn(
        2 * num_layers * page, generator=gen).to(device, dtype)
    caches = [pages[i * page:(i + 1) * page].view(num_blocks, block_size, kv_heads, head_dim)
              for i in range(2 * num_layers)]
    if scales:
        s = torch.rand(2 * num_layers, num_blocks, block_size, kv_heads, generator=gen).to(device)
        caches += list(s.unbind(0))
    return caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, FP8], ids=str)
@pytest.mark.parametrize("device,block_size,head_dim", device_cases(
    cpu_cases=[(8, 64), (16, 80)], cuda_cases=[(16, 128)]))
def test_copy_blocks_matches_reference(triton_backend, device, dtype, block_size, head_dim):
    gen = torch.Generator().manual_seed(hash((str(dtype), block_size)) % 2**31)
    num_blocks = 12 if device == "cpu" else 1024
    layers = 2 if device == "cpu" else 8
    caches = _one_allocation(layers, num_blocks, block_size, 2, head_dim, dtype, device, gen, scales=dtype == FP8)
    expect = [t.clone() for t in caches]
    perm = torch.randperm(num_blocks, generator=gen)
    n = 3 if device == "cpu" else 300
    src, dst = perm[:n].to(torch.int32).to(device), perm[n:2 * n].to(torch.int32).to(device)

    copy_blocks(caches, src, dst)
    reference.copy_blocks_reference(expect, src, dst)

    for got, want in zip(caches, expect):
        assert same_bits(got, want)
    for got in caches:  # the copies really landed (guards against a reference that does nothing)
        assert same_bits(got[dst.long()], got[src.long()])


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_hnd_views_and_lists(triton_backend, device):
    """Strided (HND-stored) page views, ids given as Python lists, and a lone per-head scale tensor group."""
    gen = torch.Generator().manual_seed(31)
    hnd = [torch.randn(6, 4, 8, 64, generator=gen).to(device, torch.float16).permute(0, 2, 1, 3) for _ in range(3)]
    expect = [t.clone() for t in hnd]
    copy_blocks(hnd, [0, 5], [2, 3])
    reference.copy_blocks_reference(expect, torch.tensor([0, 5]), torch.tensor([2, 3]))
    for got, want in zip(hnd, expect):
        assert torch.equal(got, want)
    assert torch.equal(hnd[1][3], hnd[1][5]) and not torch.equal(hnd[1][3], hnd[1][4])


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_empty_is_a_no_op(triton_backend, device):
    t = torch.randn(4, 8, 1, 64).to(device)
    before = t.clone()
    copy_blocks([t], torch.empty(0, dtype=torch.int32, device=device), torch.empty(0, dtype=torch.int32,
                                                                                     device=device))
    assert torch.equal(t, before)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_offset_cache_keys_on_dtype(triton_backend, device):
    """Regression (issue 9 item 9): the same addresses viewed with another dtype must not reuse stale offsets."""
    gen = torch.Generator().manual_seed(33)
    half = 4 * 4 * 64  # bytes of one tensor: 4 blocks of 64 float32
    buf = torch.randn(2 * half // 4, generator=gen).to(device).view(torch.uint8)

    def views(dtype, row):
        return [buf[i * half:(i + 1) * half].view(dtype).view(4, row) for i in range(2)]

    copy_blocks(views(torch.float32, 64), [0], [1])  # fills the offset cache for these two addresses
    caches = views(torch.float16, 128)  # same data pointers, 2-byte elements: other offsets
    expect = [t.clone() for t in caches]
    guard = buf.clone()
    copy_blocks(caches, [2], [3])
    reference.copy_blocks_reference(expect, torch.tensor([2]), torch.tensor([3]))
    for got, want in zip(caches, expect):
        assert same_bits(got, want)
    changed = (buf != guard).nonzero().flatten()
    assert changed.numel() == 0 or all(3 * 256 <= int(i) % half for i in changed)  # only block 3 of each


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_any_rank(triton_backend, device):
    """Regression (issue 9 item 10): 5-D tensors raised 'too many values to unpack'; collapsible or not, they copy."""
    gen = torch.Generator().manual_seed(34)
    contiguous = torch.randn(6, 2, 4, 2, 16, generator=gen).to(device)       # collapses to one row per block
    sliced = torch.randn(6, 3, 5, 7, 32, generator=gen).to(device)[:, :2, :3, :4, :16]  # 4 strided dims
    one_d = torch.randn(6, generator=gen).to(device)
    caches = [contiguous, sliced, one_d]
    expect = [t.clone() for t in caches]
    copy_blocks(caches, [0, 4], [5, 1])
    reference.copy_blocks_reference(expect, torch.tensor([0, 4]), torch.tensor([5, 1]))
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)
    assert torch.equal(sliced[5], sliced[0]) and not torch.equal(sliced[5], sliced[2])


# (src, dst, error class, message pattern) on a 4-block cache
BAD_IDS = [
    pytest.param([0.5], [1], KernelError, r"src must hold integer block ids.*0\.5", id="float"),
    pytest.param([0], [1.0], KernelError, r"dst must hold integer block ids.*1\.0", id="integral-float"),
    pytest.param([True], [2], KernelError, r"src must hold integer block ids.*True", id="bool"),
    pytest.param(np.array([0.0]), [1], KernelError, r"src must hold integer block ids", id="numpy-float"),
    pytest.param([0], ["1"], KernelError, r"dst must hold integer block ids.*'1'", id="string"),
    pytest.param([0], [2 ** 70], BlockIndexError, r"dst\[0\]=1180591620717411303424 is outside \[0, 4\)",
                 id="huge"),
    pytest.param([-1], [2], BlockIndexError, r"src\[0\]=-1 is outside \[0, 4\)", id="negative"),
    pytest.param([0], [4], BlockIndexError, r"dst\[0\]=4 is outside \[0, 4\)", id="past-end"),
    pytest.param([0, 1], [2, 2], BlockIndexError, r"repeated", id="repeated-dst"),
    pytest.param([0, 1], [2, 1], BlockIndexError, r"dst\[1\]=1 is also a src block", id="dst-is-src"),
    pytest.param(torch.tensor([True]), [2], KernelError, r"int32/int64", id="bool-tensor"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("src,dst,error,pattern", BAD_IDS)
def test_copy_blocks_refuses_bad_ids(monkeypatch, backend, src, dst, error, pattern):
    """Regression (issue 9 item 10): [0.5] was truncated to block 0; host lists are range-checked without a sync."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    monkeypatch.delenv("KVPOOL_DEBUG", raising=False)
    t = torch.arange(4 * 8, dtype=torch.float32).view(4, 8)
    before = t.clone()
    with pytest.raises(error, match=pattern):
        copy_blocks([t], src, dst)
    assert torch.equal(t, before)
