"""The lean decode launch: remembered checks (never trusted for changed tensors) and the split-K workspace.

Each invalidation case first makes a call that caches a proof, then changes ONE thing about one argument
(shape, strides, dtype, device, pointer, scalar type, environment, sinks' values) so that the checks must
fail (or at least run again): a cache that trusted the old proof would let the bad call through.
"""
import pytest
import torch
from kernels_util import (
    DEVICES,
    new_cache,
    random_tables,
    triton_backend,  # noqa: F401  (fixture)
)

from kvpool.errors import BlockIndexError, KernelError
from kvpool.kernels import DecodeWorkspace, paged_decode, reference
from kvpool.kernels import api as kernel_api
from kvpool.kernels.decode import paged_decode_triton
from kvpool.kernels.workspace import cached_workspace


def _setup(batch=2, kv_heads=2, group=2, head_dim=64, block_size=8):
    gen = torch.Generator().manual_seed(0)
    k, v, _, _ = new_cache(8, block_size, kv_heads, head_dim, torch.float32, None, "cpu", gen)
    lens = [5, 13][:batch]
    table, seq_lens = random_tables(lens, block_size, 8, "cpu", gen)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    return q, k, v, table, seq_lens


@pytest.fixture
def proofs(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    monkeypatch.delenv("KVPOOL_DEBUG", raising=False)
    cache = kernel_api._DECODE_PROOFS
    cache.clear()
    yield cache
    cache.clear()


def test_same_tensors_hit_the_cache(proofs):
    q, k, v, table, lens = _setup()
    first = paged_decode(q, k, v, table, lens, 0.125)
    assert (proofs.hits, proofs.misses) == (0, 1)
    again = paged_decode(q, k, v, table, lens, 0.125)
    assert (proofs.hits, proofs.misses) == (1, 1)
    torch.testing.assert_close(first, again)


def test_new_pointer_with_equal_metadata_is_checked_again(proofs):
    q, k, v, table, lens = _setup()
    paged_decode(q, k, v, table, lens, 0.125)
    paged_decode(q.clone(), k, v, table, lens, 0.125)
    assert proofs.misses == 2


def test_shape_change_at_the_same_pointer_is_rejected(proofs):
    q, k, v, table, lens = _setup()
    q3 = torch.cat([q, q[:1]])
    paged_decode(q3[:2], k, v, table, lens, 0.125)  # same data_ptr as q3, one row fewer
    with pytest.raises(KernelError, match="3 sequences"):
        paged_decode(q3, k, v, table, lens, 0.125)


def test_stride_change_at_the_same_pointer_and_shape_is_rejected(proofs):
    _, k, v, table, lens = _setup()
    storage = torch.randn(2, 64, 4)
    paged_decode(storage.view(2, 4, 64), k, v, table, lens, 0.125)
    with pytest.raises(KernelError, match="contiguous along head_dim"):
        paged_decode(storage.transpose(1, 2), k, v, table, lens, 0.125)  # (2, 4, 64), head_dim stride 4


def test_dtype_change_at_the_same_pointer_and_shape_is_rejected(proofs):
    q, k, v, table, lens = _setup()
    paged_decode(q, k, v, table, lens, 0.125)
    with pytest.raises(KernelError, match="q dtype torch.int32"):
        paged_decode(q.view(torch.int32), k, v, table, lens, 0.125)


def test_device_change_is_rejected(proofs):
    q, k, v, table, lens = _setup()
    on_meta = torch.empty_like(lens, device="meta")
    assert kernel_api._pc.tensor_key(on_meta)[1:4] == kernel_api._pc.tensor_key(lens)[1:4]
    paged_decode(q, k, v, table, lens, 0.125)
    with pytest.raises(KernelError, match="one device"):
        paged_decode(q, k, v, table, on_meta, 0.125)


def test_scalar_type_is_part_of_the_key(proofs):
    q, k, v, table, lens = _setup()
    paged_decode(q, k, v, table, lens, 0.125, sliding_window=2)
    with pytest.raises(KernelError, match="sliding_window"):
        paged_decode(q, k, v, table, lens, 0.125, sliding_window=2.0)  # 2.0 == 2 as a dict key


def test_environment_is_part_of_the_key(proofs, monkeypatch):
    q, k, v, table, lens = _setup()
    paged_decode(q, k, v, table, lens, 0.125)
    monkeypatch.setenv("KVPOOL_KERNELS", "nonsense")
    with pytest.raises(KernelError, match="nonsense"):
        paged_decode(q, k, v, table, lens, 0.125)


def test_cpu_sinks_values_are_checked_on_every_call(proofs):
    q, k, v, table, lens = _setup()
    sinks = torch.zeros(q.shape[1])
    paged_decode(q, k, v, table, lens, 0.125, sinks=sinks)
    sinks[1] = float("nan")
    with pytest.raises(KernelError, match="sinks"):
        paged_decode(q, k, v, table, lens, 0.125, sinks=sinks)


def test_debug_mode_is_never_cached(proofs, monkeypatch):
    monkeypatch.setenv("KVPOOL_DEBUG", "1")
    q, k, v, table, lens = _setup()
    paged_decode(q, k, v, table, lens, 0.125)
    table[0, 0] = 99  # out of range: the debug range check reads the values
    with pytest.raises(BlockIndexError):
        paged_decode(q, k, v, table, lens, 0.125)
    assert proofs.hits == 0


def test_workspace_of_another_device_is_rejected(proofs):
    q, k, v, table, lens = _setup()
    with pytest.raises(KernelError, match="workspace is on meta"):
        paged_decode(q, k, v, table, lens, 0.125, workspace=DecodeWorkspace("meta"))
    with pytest.raises(KernelError, match="DecodeWorkspace or None"):
        paged_decode(q, k, v, table, lens, 0.125, workspace=torch.empty(4))


def test_workspace_grows_and_is_reused():
    ws = DecodeWorkspace("cpu")
    part, lse = ws.split_buffers(2, 4, 3, 64)
    assert part.shape == (2, 4, 3, 64) and lse.shape == (2, 4, 3) and part.is_contiguous() and lse.is_contiguous()
    assert ws.numel == 2 * 4 * 3 * 65
    small_part, _ = ws.split_buffers(1, 4, 2, 64)
    assert small_part.data_ptr() == part.data_ptr() and ws.numel == 2 * 4 * 3 * 65  # reused, not shrunk
    big_part, big_lse = ws.split_buffers(4, 8, 4, 128)
    assert ws.numel == 4 * 8 * 4 * 129 and big_lse.shape == (4, 8, 4)
    assert big_lse.data_ptr() + big_lse.numel() * 4 <= big_part.data_ptr() + ws.numel * 4  # inside the buffer
    assert cached_workspace(torch.device("cpu")) is cached_workspace(torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_split_decode_through_a_poisoned_small_workspace(triton_backend, device):
    q, k, v, table, lens = (t.to(device) for t in _setup(batch=2, kv_heads=1, group=2, head_dim=32, block_size=4))
    ws = DecodeWorkspace(device, numel=8)
    ws._buffer.fill_(float("nan"))
    expected = reference.paged_decode_reference(q, k, v, table, lens, 0.125, compute_dtype=torch.float64)
    for _ in range(2):  # grows on the first call, reused on the second
        out = paged_decode_triton(q, k, v, table, lens, 0.125, num_splits=3, workspace=ws)
        torch.testing.assert_close(out.double(), expected.double(), atol=2e-5, rtol=2e-5)
    assert ws.numel == 2 * 2 * 3 * 33


def test_write_kv_remembers_its_checks_and_rechecks_a_changed_tensor(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    monkeypatch.delenv("KVPOOL_DEBUG", raising=False)
    proofs = kernel_api._WRITE_PROOFS
    proofs.clear()
    _, k, v, _, _ = _setup()
    new = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 9, 17])
    kernel_api.write_kv(new[:2], new[:2], k, v, slots[:2])
    kernel_api.write_kv(new[:2], new[:2], k, v, slots[:2])
    assert (proofs.hits, proofs.misses) == (1, 1)
    with pytest.raises(KernelError, match="slot_mapping has 2 slots for 3 tokens"):
        kernel_api.write_kv(new, new, k, v, slots[:2])  # same pointers, one more token
    with pytest.raises(KernelError, match="stride 0"):
        kernel_api.write_kv(new[:1], new[:1], k[:1].expand(8, -1, -1, -1), v[:1].expand(8, -1, -1, -1), slots[:1])
    proofs.clear()
