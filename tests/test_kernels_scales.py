"""fp8 per-head scales given as strided ``[kv_heads]`` views: every kernel reads head ``h`` at ``h * stride``.

Regression (issue 9 item 7): the Triton ``write_kv``, ``gather_kv`` and ``paged_decode`` read the per-head
scale of head ``h`` at ``scale_ptr + h``, so a view such as ``scales[:, 0]`` gave head 1 the wrong scale.
"""
import pytest
import torch
from kernels_util import DECODE_TOL, DEVICES, FP8, fp8_close, new_cache, random_tables, same_bits
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.kernels import gather_kv, paged_decode, reference, write_kv

KV_HEADS = 2


def _strided_head_scales(gen, device):
    """k and v per-head scales as column 0 of ``[kv_heads, 3]`` tables: stride 3, other columns far off."""
    tables = []
    for _ in range(2):
        t = torch.full((KV_HEADS, 3), 1e4)
        t[:, 0] = torch.rand(KV_HEADS, generator=gen) * 0.05 + 0.01
        tables.append(t.to(device)[:, 0])
    assert tables[0].stride() == (3,)
    return tables


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_reads_strided_head_scales(triton_backend, device):
    gen = torch.Generator().manual_seed(41)
    k, v, _, _ = new_cache(3, 8, KV_HEADS, 64, FP8, None, device, gen)
    ks, vs = _strided_head_scales(gen, device)
    key = torch.randn(10, KV_HEADS, 64, generator=gen).to(device, torch.bfloat16)
    value = torch.randn(10, KV_HEADS, 64, generator=gen).to(device, torch.bfloat16)
    slots = torch.randperm(24, generator=gen)[:10].to(device, torch.int32)
    k_ref, v_ref = k.clone(), v.clone()
    write_kv(key, value, k, v, slots, ks, vs)
    reference.write_kv_reference(key, value, k_ref, v_ref, slots, ks, vs)
    fp8_close(k, k_ref, exact=device == "cpu")
    fp8_close(v, v_ref, exact=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_reads_strided_head_scales(triton_backend, device):
    gen = torch.Generator().manual_seed(42)
    k_cache, v_cache, _, _ = new_cache(5, 8, KV_HEADS, 64, FP8, None, device, gen)
    ks, vs = _strided_head_scales(gen, device)
    table, seq_lens = random_tables([9, 12], 8, 5, device, gen)
    k, v, _ = gather_kv(k_cache, v_cache, table, seq_lens, ks, vs, out_dtype=torch.float32)
    k_ref, v_ref, _ = reference.gather_kv_reference(k_cache, v_cache, table, seq_lens, ks, vs, torch.float32)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 2])
def test_paged_decode_reads_strided_head_scales(triton_backend, device, splits):
    from kvpool.kernels.decode import paged_decode_triton
    gen = torch.Generator().manual_seed(43)
    k, v, _, _ = new_cache(6, 8, KV_HEADS, 64, FP8, None, device, gen)
    ks, vs = _strided_head_scales(gen, device)
    table, seq_lens = random_tables([13, 20], 8, 6, device, gen)
    q = torch.randn(2, 2 * KV_HEADS, 64, generator=gen).to(device, torch.float16)
    out = paged_decode_triton(q, k, v, table, seq_lens, 0.125, k_scale=ks, v_scale=vs, num_splits=splits)
    ref = reference.paged_decode_reference(q, k, v, table, seq_lens, 0.125, k_scale=ks, v_scale=vs,
                                           compute_dtype=torch.float64)
    tol = DECODE_TOL[torch.float16]
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
    # the public entry point takes the same path
    torch.testing.assert_close(paged_decode(q, k, v, table, seq_lens, 0.125, k_scale=ks, v_scale=vs).double(),
                               ref.double(), atol=tol, rtol=tol)
