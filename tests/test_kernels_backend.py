"""Backend switch (KVPOOL_KERNELS), debug range checks (KVPOOL_DEBUG) and argument errors."""
import numpy as np
import pytest
import torch
from kernels_util import FP8, INTERPRET

import kvpool
from kvpool.errors import BlockIndexError, KernelError
from kvpool.kernels import copy_blocks, gather_kv, paged_decode, write_kv
from kvpool.kernels import decode as decode_module


def _small(dtype=torch.float16):
    k = torch.randn(4, 8, 2, 64).to(dtype)
    v = torch.randn(4, 8, 2, 64).to(dtype)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    lens = torch.tensor([10, 3], dtype=torch.int32)
    q = torch.randn(2, 4, 64).to(torch.float16 if dtype == FP8 else dtype)
    return q, k, v, table, lens


def test_public_names_are_the_kernels():
    assert kvpool.paged_decode is paged_decode and kvpool.write_kv is write_kv
    assert kvpool.gather_kv is gather_kv and kvpool.copy_blocks is copy_blocks


def test_torch_backend_never_touches_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel ran although KVPOOL_KERNELS=torch")

    monkeypatch.setattr(decode_module, "paged_decode_triton", boom)
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    q, k, v, table, lens = _small()
    out = paged_decode(q, k, v, table, lens, 0.125)
    assert out.shape == q.shape and torch.isfinite(out).all()
    monkeypatch.setenv("KVPOOL_KERNELS", "triton")
    if INTERPRET:
        with pytest.raises(AssertionError, match="Triton kernel ran"):
            paged_decode(q, k, v, table, lens, 0.125)


def test_cpu_tensors_default_to_torch(monkeypatch):
    monkeypatch.delenv("KVPOOL_KERNELS", raising=False)
    monkeypatch.setattr(decode_module, "paged_decode_triton", lambda *a, **k: pytest.fail("Triton ran on CPU"))
    q, k, v, table, lens = _small()
    paged_decode(q, k, v, table, lens, 0.125)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_default_to_triton(monkeypatch):
    monkeypatch.delenv("KVPOOL_KERNELS", raising=False)
    calls = []
    real = decode_module.paged_decode_triton
    monkeypatch.setattr(decode_module, "paged_decode_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, table, lens = (t.cuda() for t in _small())
    out = paged_decode(q, k, v, table, lens, 0.125)
    assert calls == [1] and out.is_cuda
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    torch.testing.assert_close(paged_decode(q, k, v, table, lens, 0.125), out, atol=2e-3, rtol=2e-3)
    assert calls == [1]


def test_backend_env_errors(monkeypatch):
    q, k, v, table, lens = _small()
    monkeypatch.setenv("KVPOOL_KERNELS", "cuda")
    with pytest.raises(KernelError, match="not a backend"):
        paged_decode(q, k, v, table, lens, 0.125)
    monkeypatch.setenv("KVPOOL_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        paged_decode(q, k, v, table, lens, 0.125)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_debug_switch_range_checks(monkeypatch, backend):
    if backend == "triton" and not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    monkeypatch.setenv("KVPOOL_DEBUG", "1")
    q, k, v, table, lens = _small()
    bad_table = table.clone()
    bad_table[1, 0] = 4  # == num_blocks
    with pytest.raises(BlockIndexError, match=r"block_table\[1, 0\]=4"):
        paged_decode(q, k, v, bad_table, lens, 0.125)
    with pytest.raises(BlockIndexError, match=r"block_table\[1, 0\]=4"):
        gather_kv(k, v, bad_table, lens)
    bad_table[1, 1] = -1  # padding beyond sequence 1's one block: fine
    bad_table[1, 0] = 1
    paged_decode(q, k, v, bad_table, lens, 0.125)
    with pytest.raises(BlockIndexError, match=r"seq_lens\[0\]=17"):
        paged_decode(q, k, v, table, torch.tensor([17, 3], dtype=torch.int32), 0.125)
    key = torch.randn(3, 2, 64).half()
    with pytest.raises(BlockIndexError, match=r"slot_mapping\[2\]=32"):
        write_kv(key, key, k, v, torch.tensor([0, -1, 32], dtype=torch.int32))
    with pytest.raises(BlockIndexError, match="dst"):
        copy_blocks([k, v], [0, 1], [1, 2])  # dst 1 is also a src
    with pytest.raises(BlockIndexError, match=r"src\[0\]=9"):
        copy_blocks([k, v], [9], [1])
    before = k.clone()
    with pytest.raises(BlockIndexError):
        write_kv(key, key, k, v, torch.tensor([0, 1, 99], dtype=torch.int32))
    assert torch.equal(k, before)  # raised before anything was written


def test_argument_errors(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    q, k, v, table, lens = _small()
    with pytest.raises(KernelError, match="4-D"):
        paged_decode(q, k[0], v[0], table, lens, 0.125)
    with pytest.raises(KernelError, match="cast q"):
        paged_decode(q.float(), k, v, table, lens, 0.125)
    with pytest.raises(KernelError, match="multiple of kv_heads"):
        paged_decode(q[:, :3], k, v, table, lens, 0.125)
    with pytest.raises(KernelError, match="one row per sequence"):
        paged_decode(q, k, v, table[:1], lens, 0.125)
    with pytest.raises(KernelError, match="sliding_window"):
        paged_decode(q, k, v, table, lens, 0.125, sliding_window=0)
    with pytest.raises(KernelError, match="logit_soft_cap"):
        paged_decode(q, k, v, table, lens, 0.125, logit_soft_cap=-1.0)
    with pytest.raises(KernelError, match="int32 or int64"):
        paged_decode(q, k, v, table.float(), lens, 0.125)
    with pytest.raises(KernelError, match="contiguous along head_dim"):
        paged_decode(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, table, lens, 0.125)
    with pytest.raises(KernelError, match="same shape and dtype"):
        gather_kv(k, v.float(), table, lens)
    with pytest.raises(KernelError, match="only for float8"):
        gather_kv(k, v, table, lens, torch.ones(2), torch.ones(2))
    with pytest.raises(KernelError, match="one each"):
        write_kv(q[:, :2], q[:, :2], k, v, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(KernelError, match="pair up"):
        copy_blocks([k], [0, 1], [2])
    with pytest.raises(KernelError, match="non-empty list"):
        copy_blocks(k, [0], [1])


def test_fp8_scale_errors(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    q, k, v, table, lens = _small(FP8)
    with pytest.raises(KernelError, match="needs k_scale and v_scale"):
        paged_decode(q, k, v, table, lens, 0.125)
    with pytest.raises(KernelError, match="fits neither"):
        paged_decode(q, k, v, table, lens, 0.125, k_scale=torch.ones(3), v_scale=torch.ones(3))
    with pytest.raises(KernelError, match="float32"):
        paged_decode(q, k, v, table, lens, 0.125, k_scale=torch.ones(2).half(), v_scale=torch.ones(2).half())
    out = paged_decode(q, k, v, table, lens, 0.125, k_scale=torch.ones(2), v_scale=torch.ones(2))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# (paged_decode keyword arguments, error pattern): bools are not numbers here, floats not window lengths
BAD_DECODE_SCALARS = [
    pytest.param({"sliding_window": True}, r"sliding_window must be a positive int or None, got True",
                 id="window-bool"),
    pytest.param({"sliding_window": False}, r"sliding_window must be a positive int or None, got False",
                 id="window-false"),
    pytest.param({"sliding_window": 4.0}, r"sliding_window must be a positive int or None, got 4\.0",
                 id="window-float"),
    pytest.param({"sliding_window": torch.tensor(True)}, r"sliding_window must be a positive int",
                 id="window-bool-tensor"),
    pytest.param({"scale": True}, r"scale must be a finite float, got True", id="scale-bool"),
    pytest.param({"logit_soft_cap": True}, r"logit_soft_cap must be a finite float, got True", id="cap-bool"),
    pytest.param({"scale": float("nan")}, r"scale must be a finite float", id="scale-nan"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs,pattern", BAD_DECODE_SCALARS)
def test_paged_decode_refuses_bool_and_float_scalars(monkeypatch, backend, kwargs, pattern):
    """Regression (issue 9 item 10): sliding_window=True was taken as a window of 1 token."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    q, k, v, table, lens = _small()
    args = {"scale": 0.125, **kwargs}
    with pytest.raises(KernelError, match=pattern):
        paged_decode(q, k, v, table, lens, **args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_decode_window_past_int32_is_no_window(monkeypatch, backend):
    """A window wider than any sequence (even past int32, or a numpy int) changes nothing."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    q, k, v, table, lens = _small()
    full = paged_decode(q, k, v, table, lens, 0.125)
    for window in (2 ** 40, 2 ** 70, np.int64(16)):
        assert torch.equal(paged_decode(q, k, v, table, lens, 0.125, sliding_window=window), full)


def _expanded_targets():
    """(name, call) pairs whose written tensor is an expand()-ed view: elements sharing memory."""
    key = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    shared = torch.zeros(1, 8, 2, 64).expand(4, 8, 2, 64)
    fp8 = torch.zeros(4, 8, 2, 64).to(FP8)
    one_scale = torch.ones(1, 1, 1).expand(4, 8, 2)
    q, k, v, table, lens = _small(torch.float32)
    return [
        ("k_cache", lambda: write_kv(key, key, shared, shared, slots)),
        ("k_scale", lambda: write_kv(key, key, fp8, fp8.clone(), slots, one_scale, one_scale)),
        (r"caches\[1\]", lambda: copy_blocks([k, torch.zeros(8, 2, 64).expand(4, 8, 2, 64)], [0], [1])),
        ("out", lambda: paged_decode(q, k, v, table, lens, 0.125, out=torch.zeros(1, 4, 64).expand(2, 4, 64))),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(4), ids=["write-cache", "write-scale", "copy", "decode-out"])
def test_expanded_write_targets_are_refused(monkeypatch, backend, case):
    """A kernel never writes through a stride-0 view (Triton raced, torch warned or raised RuntimeError)."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    name, call = _expanded_targets()[case]
    with pytest.raises(KernelError, match=rf"{name} is written but has stride 0"):
        call()
