"""Shared helpers of the kernel tests (not a test module).

Tests run the Triton kernels on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` when CUDA is absent) and on CUDA when present (``-m gpu``, larger shapes).
"""
from __future__ import annotations

import os

import pytest
import torch

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# cpu: Triton's interpreter (needs TRITON_INTERPRET=1, set by conftest without CUDA); cuda: real kernels
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1 "
                                                 "(conftest sets it only when CUDA is absent)")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]



def device_cases(cpu_cases, cuda_cases):
    """``(device, *case)`` params: small cases under the interpreter, realistic ones on CUDA (fewer: each
    distinct shape compiles its own kernel, and the GPU check has a time budget)."""
    out = []
    for dev, cases in ((DEVICES[0], cpu_cases), (DEVICES[1], cuda_cases)):
        for case in cases:
            out.append(pytest.param(dev.values[0], *case, marks=dev.marks,
                                    id="-".join([dev.values[0]] + [str(c) for c in case])))
    return out


# (cache dtype, fp8 scale kind): kind None | "head" ([kv_heads]) | "token_head" ([num_blocks, block_size, kv_heads])
CACHE_KINDS = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(FP8, "head", id="fp8-head"),
    pytest.param(FP8, "token_head", id="fp8-token"),
]

# decode output tolerance (atol = rtol) against a float64 reference, by query/compute dtype
DECODE_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) for the test's calls."""
    monkeypatch.setenv("KVPOOL_KERNELS", "triton")
    monkeypatch.delenv("KVPOOL_DEBUG", raising=False)


def compute_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """Dtype of new tokens / queries for a cache dtype (bf16 for fp8 caches)."""
    return torch.bfloat16 if cache_dtype == FP8 else cache_dtype


def new_cache(num_blocks, block_size, kv_heads, head_dim, dtype, scale_kind, device, gen, hnd=False):
    """Random K/V page tensors and scales; ``hnd`` gives HND storage passed as an NHD-shaped view."""
    def pages():
        shape = (num_blocks, kv_heads, block_size, head_dim) if hnd else (num_blocks, block_size, kv_heads, head_dim)
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
        x = x.to(dtype)
        return x.permute(0, 2, 1, 3) if hnd else x
    k, v = pages(), pages()
    if scale_kind == "head":
        ks = (torch.rand(kv_heads, generator=gen) * 0.05 + 0.01).to(device)
        vs = (torch.rand(kv_heads, generator=gen) * 0.05 + 0.01).to(device)
    elif scale_kind == "token_head":
        ks = (torch.rand(num_blocks, block_size, kv_heads, generator=gen) * 0.05 + 0.01).to(device)
        vs = (torch.rand(num_blocks, block_size, kv_heads, generator=gen) * 0.05 + 0.01).to(device)
    else:
        ks = vs = None
    return k, v, ks, vs


def random_tables(seq_lens, block_size, num_blocks, device, gen, extra_cols=1):
    """A block table of distinct random (non-contiguous) block ids; unused entries hold -1 padding."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(need + [1]) + extra_cols
    assert sum(need) <= num_blocks, "test cache too small"
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    return table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison compares equal to itself)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def fp8_close(a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    """fp8 tensors equal (CPU: same math, same rounding), or within one fp8 step (GPU division)."""
    if exact:
        assert same_bits(a, b)
        return
    x, y = a.float(), b.float()
    nan = torch.isnan(y)
    assert torch.equal(torch.isnan(x), nan), "written/unwritten (NaN poison) positions differ"
    x, y = x[~nan], y[~nan]
    assert torch.all((x - y).abs() <= y.abs() * 0.125 + 2.0 ** -9), (x - y).abs().max()
