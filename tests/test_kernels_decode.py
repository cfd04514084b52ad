"""paged_decode (Triton) against a float64 torch reference.

Covers every cache dtype (fp8 with both scale kinds), GQA ratios 1/4/8, head_dim 64/80/96/128/256,
block sizes 8..128, ragged lengths (1, a block, one past a block, one past a 64-token tile), the
one-pass and the split + merge paths, sliding windows, soft caps, and empty (seq_len 0) rows.
Outputs are NaN-poisoned before each run.
"""
import math

import pytest
import torch
from kernels_util import DECODE_TOL, DEVICES, FP8, compute_dtype, new_cache, random_tables
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.kernels import paged_decode, reference
from kvpool.kernels.decode import choose_num_splits, paged_decode_triton

# (cache dtype, fp8 scale kind, q heads per kv head, head_dim, block_size, kv_heads)
CASES = [
    pytest.param(torch.float32, None, 1, 64, 8, 2, id="fp32-g1-d64-bs8"),
    pytest.param(torch.float16, None, 4, 80, 16, 2, id="fp16-g4-d80-bs16"),
    pytest.param(torch.bfloat16, None, 8, 128, 32, 1, id="bf16-g8-d128-bs32"),
    pytest.param(torch.bfloat16, None, 4, 96, 8, 2, id="bf16-g4-d96-bs8"),
    pytest.param(torch.bfloat16, None, 4, 128, 16, 2, id="bf16-g4-d128-bs16"),  # the benchmark's shape on CUDA
    pytest.param(torch.bfloat16, None, 1, 64, 128, 1, id="bf16-g1-d64-bs128"),
    pytest.param(torch.float16, None, 2, 256, 16, 1, id="fp16-g2-d256-bs16"),
    pytest.param(FP8, "head", 4, 64, 16, 2, id="fp8head-g4-d64-bs16"),
    pytest.param(FP8, "token_head", 8, 80, 8, 1, id="fp8token-g8-d80-bs8"),
]


def _lengths(block_size, device):
    base = [1, block_size, block_size + 1, 65, 0]
    return base if device == "cpu" else base + [4096, 1000, 3 * 64 * 7 + 5]


def _run(q, k, v, table, lens, scale, window=None, cap=None, ks=None, vs=None, splits=None):
    out = torch.full_like(q, float("nan"))
    if splits is None:
        return paged_decode(q, k, v, table, lens, scale, window, cap, ks, vs, out=out)
    return paged_decode_triton(q, k, v, table, lens, scale, window, cap, ks, vs, num_splits=splits, out=out)


def _check(out, q, k, v, table, lens, scale, window=None, cap=None, ks=None, vs=None):
    ref = reference.paged_decode_reference(q, k, v, table, lens, scale, window, cap, ks, vs,
                                           compute_dtype=torch.float64)
    tol = DECODE_TOL[q.dtype]
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
    empty = lens == 0
    assert torch.all(out[empty] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale_kind,group,head_dim,block_size,kv_heads", CASES)
def test_paged_decode_matches_reference(triton_backend, device, dtype, scale_kind, group, head_dim, block_size,
                                        kv_heads):
    gen = torch.Generator().manual_seed(hash((str(dtype), group, head_dim, block_size)) % 2**31)
    lens = _lengths(block_size, device)
    if device == "cuda":
        kv_heads *= 4
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 4
    k, v, ks, vs = new_cache(num_blocks, block_size, kv_heads, head_dim, dtype, scale_kind, device, gen)
    table, seq_lens = random_tables(lens, block_size, num_blocks, device, gen)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(device, compute_dtype(dtype))
    scale = head_dim ** -0.5
    for splits in (None, 1, 3):  # heuristic (one pass here), forced one pass, split + merge
        out = _run(q, k, v, table, seq_lens, scale, ks=ks, vs=vs, splits=splits)
        _check(out, q, k, v, table, seq_lens, scale, ks=ks, vs=vs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,cap", [(1, None), (5, None), (64, None), (None, 30.0), (70, 5.0)])
def test_paged_decode_sliding_window_and_soft_cap(triton_backend, device, window, cap):
    gen = torch.Generator().manual_seed(21)
    lens = [1, 4, 64, 65, 150] if device == "cpu" else [1, 4, 64, 65, 150, 5000, 20000]
    block_size, kv_heads, group, head_dim = 16, 2, 4, 64
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 2
    k, v, _, _ = new_cache(num_blocks, block_size, kv_heads, head_dim, torch.bfloat16, None, device, gen)
    table, seq_lens = random_tables(lens, block_size, num_blocks, device, gen)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(device, torch.bfloat16) * 4
    for splits in (1, 2):
        out = _run(q, k, v, table, seq_lens, 0.125, window, cap, splits=splits)
        _check(out, q, k, v, table, seq_lens, 0.125, window, cap)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_window_changes_the_result(triton_backend, device):
    """The window is applied: with W=1 the output is exactly the value of the last token."""
    gen = torch.Generator().manual_seed(22)
    k, v, _, _ = new_cache(8, 8, 1, 64, torch.float32, None, device, gen)
    table, seq_lens = random_tables([30], 8, 8, device, gen)
    q = torch.randn(1, 2, 64, generator=gen).to(device)
    out = _run(q, k, v, table, seq_lens, 0.125, window=1)
    last = v[int(table[0, 29 // 8]), 29 % 8, 0]
    torch.testing.assert_close(out[0], last.expand(2, 64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_split_heuristic_path(triton_backend, device):
    """A small batch takes the split + merge path by itself (no forced split count)."""
    gen = torch.Generator().manual_seed(23)
    lens = [300, 0] if device == "cpu" else [30000, 0]
    num_blocks = sum((n + 15) // 16 for n in lens) + 1
    k, v, _, _ = new_cache(num_blocks, 16, 1, 64, torch.float16, None, device, gen)
    table, seq_lens = random_tables(lens, 16, num_blocks, device, gen)
    q = torch.randn(2, 8, 64, generator=gen).to(device, torch.float16)
    out = _run(q, k, v, table, seq_lens, 0.125)
    _check(out, q, k, v, table, seq_lens, 0.125)


def test_choose_num_splits():
    assert choose_num_splits(batch=64, kv_heads=8, max_tokens=4096, block_n=64, num_sms=132) == 1
    assert choose_num_splits(batch=256, kv_heads=8, max_tokens=512, block_n=64, num_sms=132) == 1
    one = choose_num_splits(batch=1, kv_heads=8, max_tokens=32768, block_n=64, num_sms=132)
    assert one == math.ceil(4 * 132 / 8)  # enough programs for ~4 per SM
    assert choose_num_splits(batch=1, kv_heads=8, max_tokens=128, block_n=64, num_sms=132) == 1  # 2 tiles
    assert choose_num_splits(batch=8, kv_heads=8, max_tokens=4096, block_n=64, num_sms=132) == 9
