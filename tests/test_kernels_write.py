"""write_kv (Triton) against its torch reference: every dtype, fp8 scale kinds, ragged slots, -1 skips."""
import pytest
import torch
from kernels_util import CACHE_KINDS, DEVICES, device_cases, FP8, compute_dtype, fp8_close, new_cache, same_bits
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.kernels import reference, write_kv


def _poisoned_cache(shape_args, dtype, scale_kind, device, gen, hnd=False):
    k, v, ks, vs = new_cache(*shape_args, dtype, scale_kind, device, gen, hnd=hnd)
    for t in (k, v):
        t.view(torch.uint8).fill_(0xFF)  # NaN in fp8/fp16/bf16/fp32 alike: untouched slots stay NaN
    if scale_kind == "token_head":
        ks.fill_(float("nan"))
        vs.fill_(float("nan"))
    return k, v, ks, vs


def _clone(*ts):
    return [None if t is None else t.clone() for t in ts]


@pytest.mark.parametrize("dtype,scale_kind", CACHE_KINDS)
@pytest.mark.parametrize("device,block_size,head_dim,kv_heads", device_cases(
    cpu_cases=[(8, 64, 2), (16, 80, 1), (32, 96, 4)], cuda_cases=[(16, 128, 8), (32, 80, 2)]))
def test_write_kv_matches_reference(triton_backend, device, dtype, scale_kind, block_size, head_dim, kv_heads):
    gen = torch.Generator().manual_seed(hash((str(dtype), scale_kind, block_size, head_dim)) % 2**31)
    num_blocks = 6 if device == "cpu" else 512
    num_tokens = 2 * block_size + 1 if device == "cpu" else 3000
    # K and V as slices of a fused QKV output: strided, head_dim contiguous
    qkv = torch.randn(num_tokens, 3 * kv_heads, head_dim, generator=gen).to(device, compute_dtype(dtype)) * 3
    key, value = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[torch.randperm(num_tokens, generator=gen)[: max(1, num_tokens // 10)]] = -1  # padding tokens
    slots = slots.to(device)
    k, v, ks, vs = _poisoned_cache((num_blocks, block_size, kv_heads, head_dim), dtype, scale_kind, device, gen)
    k_ref, v_ref, ks_ref, vs_ref = _clone(k, v, ks, vs)

    write_kv(key, value, k, v, slots, ks, vs)
    reference.write_kv_reference(key, value, k_ref, v_ref, slots, ks_ref, vs_ref)

    if dtype == FP8:
        fp8_close(k, k_ref, exact=device == "cpu")
        fp8_close(v, v_ref, exact=device == "cpu")
        if scale_kind == "token_head":
            torch.testing.assert_close(ks, ks_ref, rtol=1e-6, atol=0, equal_nan=True)
            torch.testing.assert_close(vs, vs_ref, rtol=1e-6, atol=0, equal_nan=True)
    else:
        assert same_bits(k, k_ref) and same_bits(v, v_ref)
    # the -1 slots and the untouched slots kept their poison; written slots hold finite values
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0].long()] = True
    k_flat = k.float().reshape(num_blocks * block_size, -1)
    assert torch.isnan(k_flat[~written]).all() and torch.isfinite(k_flat[written]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_fp8_round_trip_error_is_within_one_step(triton_backend, device):
    """Quantize then dequantize: per token-and-head scales keep every value within half an fp8 step."""
    gen = torch.Generator().manual_seed(7)
    k, v, ks, vs = new_cache(4, 16, 2, 64, FP8, "token_head", device, gen)
    key = (torch.randn(40, 2, 64, generator=gen) * torch.logspace(-3, 2, 40)[:, None, None]).to(device)
    value = torch.randn(40, 2, 64, generator=gen).to(device)
    value[3] = 0.0  # an all-zero row: scale 0, stored zeros (no 0/0)
    slots = torch.arange(40, dtype=torch.int32, device=device)
    write_kv(key, value, k, v, slots, ks, vs)
    deq = k.reshape(64, 2, 64)[:40].float() * ks.reshape(64, 2)[:40, :, None]
    amax = key.abs().amax(-1, keepdim=True)
    assert torch.all((deq - key).abs() <= amax * 2.0 ** -4 + 1e-12)
    assert torch.all(v.reshape(64, 2, 64)[3].float() == 0) and torch.all(vs.reshape(64, 2)[3] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_into_hnd_pages(triton_backend, device):
    """HND storage [num_blocks, kv_heads, block_size, head_dim] passed as its NHD-ordered view."""
    gen = torch.Generator().manual_seed(3)
    k, v, _, _ = new_cache(5, 8, 4, 64, torch.float16, None, device, gen, hnd=True)
    assert not k.is_contiguous()
    k_ref, v_ref = k.clone(), v.clone()
    key = torch.randn(20, 4, 64, generator=gen).to(device, torch.float16)
    value = torch.randn(20, 4, 64, generator=gen).to(device, torch.float16)
    slots = torch.randperm(40, generator=gen)[:20].to(device, torch.int32)
    write_kv(key, value, k, v, slots)
    reference.write_kv_reference(key, value, k_ref, v_ref, slots)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_casts_float32_tokens_into_bf16_pages(triton_backend, device):
    gen = torch.Generator().manual_seed(5)
    k, v, _, _ = new_cache(3, 16, 2, 64, torch.bfloat16, None, device, gen)
    key = torch.randn(48, 2, 64, generator=gen).to(device)
    slots = torch.randperm(48, generator=gen).to(device, torch.int32)
    write_kv(key, key * 2, k, v, slots)
    expect = key.to(torch.bfloat16)
    got = k.reshape(48, 2, 64)[slots.long()]
    assert torch.equal(got, expect)
