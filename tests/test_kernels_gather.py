"""gather_kv (Triton) against its torch reference: dtypes, block sizes, ragged lengths, poisoned outputs."""
import pytest
import torch
from kernels_util import CACHE_KINDS, DEVICES, INTERPRET, device_cases, FP8, new_cache, random_tables, same_bits
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.errors import KernelError
from kvpool.kernels import gather_kv, reference


def _lengths(block_size, device):
    base = [1, block_size, block_size + 1, 0, 3 * block_size - 1]
    return base if device == "cpu" else base + [4096, 777, 64 * block_size]


def _poisoned_out(total, kv_heads, head_dim, dtype, device):
    """Output views inside a NaN buffer with one guard row on each side (catches stray writes)."""
    buf = torch.full((total + 2, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    return buf, (buf[1:total + 1], torch.full_like(buf[1:total + 1], float("nan")))


@pytest.mark.parametrize("dtype,scale_kind", CACHE_KINDS)
@pytest.mark.parametrize("device,block_size,head_dim,kv_heads", device_cases(
    cpu_cases=[(8, 64, 2), (16, 80, 1), (32, 96, 4)], cuda_cases=[(16, 128, 8), (32, 80, 2)]))
def test_gather_kv_matches_reference(triton_backend, device, dtype, scale_kind, block_size, head_dim, kv_heads):
    gen = torch.Generator().manual_seed(hash((str(dtype), scale_kind, block_size, head_dim, 1)) % 2**31)
    lens = _lengths(block_size, device)
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    k_cache, v_cache, ks, vs = new_cache(num_blocks, block_size, kv_heads, head_dim, dtype, scale_kind, device, gen)
    table, seq_lens = random_tables(lens, block_size, num_blocks, device, gen)
    out_dtype = torch.bfloat16 if dtype == FP8 else dtype
    buf, out = _poisoned_out(sum(lens), kv_heads, head_dim, out_dtype, device)

    k, v, cu = gather_kv(k_cache, v_cache, table, seq_lens, ks, vs, out=out)
    k_ref, v_ref, cu_ref = reference.gather_kv_reference(k_cache, v_cache, table, seq_lens, ks, vs)

    assert k.data_ptr() == out[0].data_ptr() and k.dtype == out_dtype
    assert cu.dtype == torch.int32 and cu.tolist() == cu_ref.tolist() == [0] + torch.tensor(lens).cumsum(0).tolist()
    if dtype == FP8 and device != "cpu":  # GPU may fuse x * scale differently: one bf16 rounding step
        torch.testing.assert_close(k, k_ref, rtol=2 ** -8, atol=0)
        torch.testing.assert_close(v, v_ref, rtol=2 ** -8, atol=0)
    else:
        assert same_bits(k, k_ref) and same_bits(v, v_ref)
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[-1]).all()  # guard rows untouched


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_allocates_and_converts(triton_backend, device):
    """Without ``out``: allocated outputs; ``out_dtype`` converts; HND pages through their NHD view."""
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, _, _ = new_cache(9, 16, 2, 64, torch.float16, None, device, gen, hnd=True)
    table, seq_lens = random_tables([17, 5, 32], 16, 9, device, gen)
    k, v, cu = gather_kv(k_cache, v_cache, table, seq_lens, out_dtype=torch.float32)
    k_ref, v_ref, _ = reference.gather_kv_reference(k_cache, v_cache, table, seq_lens, out_dtype=torch.float32)
    assert k.shape == (54, 2, 64) and k.dtype == torch.float32
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref) and cu.tolist() == [0, 17, 22, 54]
    # the sequence's rows are its tokens in order: token 16 of sequence 0 is page table[0, 1], offset 0
    assert torch.equal(k[16], k_cache[int(table[0, 1]), 0].float())


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_fp8_to_float32(triton_backend, device):
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache, ks, vs = new_cache(6, 8, 2, 64, FP8, "token_head", device, gen)
    table, seq_lens = random_tables([9, 20], 8, 6, device, gen)
    k, v, _ = gather_kv(k_cache, v_cache, table, seq_lens, ks, vs, out_dtype=torch.float32, total_tokens=29)
    k_ref, v_ref, _ = reference.gather_kv_reference(k_cache, v_cache, table, seq_lens, ks, vs, torch.float32)
    torch.testing.assert_close(k, k_ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=1e-7, atol=0)


def _sixty_rows_case(device):
    gen = torch.Generator().manual_seed(13)
    k_cache, v_cache, _, _ = new_cache(6, 8, 2, 64, torch.float16, None, device, gen)
    table, seq_lens = random_tables([20, 12], 8, 6, device, gen)
    return k_cache, v_cache, table, seq_lens


def _guarded_out(rows, device, guard=2):
    """``(buf, (k, v))``: k a ``rows``-row view inside a NaN buffer with ``guard`` rows each side."""
    buf = torch.full((rows + 2 * guard, 2, 64), float("nan"), dtype=torch.float16, device=device)
    return buf, (buf[guard:guard + rows], torch.full((rows, 2, 64), float("nan"), dtype=torch.float16,
                                                     device=device))


# (total_tokens, out rows or None, error pattern): sum(seq_lens) is 32
BAD_TOTALS = [
    pytest.param(4, None, r"total_tokens=4 .*sum\(seq_lens\) is 32", id="total-short"),
    pytest.param(40, None, r"total_tokens=40 .*sum\(seq_lens\) is 32", id="total-long"),
    pytest.param(None, 20, r"out holds 20 rows .*sum\(seq_lens\) is 32", id="out-short"),
    pytest.param(None, 33, r"out holds 33 rows .*sum\(seq_lens\) is 32", id="out-long"),
    pytest.param(31, 32, r"total_tokens=31 .*out holds 32 rows", id="total-vs-out"),
    pytest.param(4.0, None, r"total_tokens must be a non-negative int.*4\.0", id="total-float"),
    pytest.param(True, None, r"total_tokens must be a non-negative int.*True", id="total-bool"),
    pytest.param(-1, None, r"total_tokens must be a non-negative int.*-1", id="total-negative"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("total_tokens,out_rows,error", BAD_TOTALS)
def test_gather_kv_checks_total_tokens_and_out_rows(monkeypatch, backend, total_tokens, out_rows, error):
    """Regression (issue 9 item 8): the Triton path trusted total_tokens and out's rows and wrote past them."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    monkeypatch.delenv("KVPOOL_DEBUG", raising=False)
    k_cache, v_cache, table, seq_lens = _sixty_rows_case("cpu")
    buf, out = _guarded_out(out_rows, "cpu") if out_rows is not None else (None, None)
    with pytest.raises(KernelError, match=error):
        gather_kv(k_cache, v_cache, table, seq_lens, total_tokens=total_tokens, out=out)
    if buf is not None:
        assert torch.isnan(buf).all()  # nothing written


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_triton_never_writes_past_out(device):
    """Below the public checks (a CUDA caller without KVPOOL_DEBUG): rows past ``out`` are dropped, not written."""
    from kvpool.kernels.gather import gather_kv_triton
    k_cache, v_cache, table, seq_lens = _sixty_rows_case(device)
    k_ref, _, cu = reference.gather_kv_reference(k_cache, v_cache, table, seq_lens)
    buf, (k, v) = _guarded_out(20, device)
    gather_kv_triton(k_cache, v_cache, table, seq_lens, cu, k, v)
    assert same_bits(k, k_ref[:20])
    assert torch.isnan(buf[:2]).all() and torch.isnan(buf[-2:]).all()
    # a negative length moves the next sequence's start before row 0: those rows are dropped too
    lens = torch.tensor([-5, 12], dtype=torch.int32, device=device)
    cu = torch.tensor([0, -5, 7], dtype=torch.int32, device=device)
    buf, (k, v) = _guarded_out(7, device)
    gather_kv_triton(k_cache, v_cache, table, lens, cu, k, v)
    assert torch.isnan(buf[:2]).all() and torch.isnan(buf[-2:]).all()
    assert same_bits(k, k_ref[20 + 5:32])
