"""Attention sinks (gpt-oss, #13 item 4): a per-q-head logit in the softmax's denominator, no value.

The references against a direct softmax with an extra column; the Triton decode kernel (one pass and
split + merge) against the reference with and without window / soft cap, GQA, and a sink that dominates;
`prefill_attention` (causal, over gathered K/V) against the reference and against decode; every bad
`sinks` refused with a message naming the value and the fix.
"""
import math

import pytest
import torch
from kernels_util import DECODE_TOL, DEVICES, new_cache, random_tables
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.errors import KernelError
from kvpool.kernels import gather_kv, paged_decode, prefill_attention, reference
from kvpool.kernels.decode import paged_decode_triton


def _direct(q_row, keys, values, scale, cap, sink):
    """One query head over its keys, the textbook way: scores, an extra sink column, softmax, drop it.

    q_row [D], keys/values [n, D] float64; sink a float or None.
    """
    scores = [float(q_row @ key) * scale for key in keys]
    if cap:
        scores = [cap * math.tanh(x / cap) for x in scores]
    columns = scores + ([sink] if sink is not None else [])
    if not columns:
        return torch.zeros_like(q_row)
    top = max(columns)
    weights = [math.exp(x - top) for x in columns]
    den = sum(weights)
    out = torch.zeros_like(q_row)
    for w, value in zip(weights, values):  # the sink column (last) carries no value
        out += w / den * value
    return out


def _random_decode(gen, lens, block_size=8, kv_heads=2, group=4, head_dim=16, dtype=torch.float32, device="cpu"):
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    k, v, _, _ = new_cache(num_blocks, block_size, kv_heads, head_dim, dtype, None, device, gen)
    table, seq_lens = random_tables(lens, block_size, num_blocks, device, gen)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(device, dtype)
    sinks = (torch.randn(kv_heads * group, generator=gen) * 2).to(device)
    return q, k, v, table, seq_lens, sinks


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 2.0), (5, 1.5)])
def test_decode_reference_is_a_softmax_with_an_extra_column(window, cap):
    gen = torch.Generator().manual_seed(31)
    q, k, v, table, lens, sinks = _random_decode(gen, [1, 7, 8, 19, 0])
    sinks[3] = 30.0  # a sink that takes almost all the weight
    sinks[5] = float("-inf")  # no sink
    out = reference.paged_decode_reference(q, k, v, table, lens, 0.3, window, cap, sinks=sinks,
                                           compute_dtype=torch.float64)
    keys, values, cu = gather_kv(k, v, table, lens)
    for b in range(len(lens)):
        n = int(lens[b])
        first = 0 if window is None else max(0, n - window)
        for h in range(q.shape[1]):
            rows = slice(int(cu[b]) + first, int(cu[b]) + n)
            expect = _direct(q[b, h].double(), keys[rows, h // 4].double(), values[rows, h // 4].double(), 0.3, cap,
                             float(sinks[h]) if sinks[h] > -math.inf else None)
            torch.testing.assert_close(out[b, h].double(), expect, atol=1e-6, rtol=1e-6)
    assert torch.all(out[4] == 0)  # seq_len 0: zeros, sink or not
    assert out[1:4, 3].abs().max() < 1e-6  # the dominating sink leaves (almost) nothing


@pytest.mark.parametrize("window,cap", [(None, None), (4, None), (None, 2.0), (6, 1.5)])
def test_prefill_reference_is_a_causal_softmax_with_an_extra_column(window, cap):
    gen = torch.Generator().manual_seed(32)
    n_q, n_k = [3, 0, 5, 1], [3, 2, 12, 9]  # queries are each sequence's last tokens (a cached prefix before)
    q = torch.randn(sum(n_q), 4, 8, generator=gen)
    k, v = torch.randn(sum(n_k), 2, 8, generator=gen), torch.randn(sum(n_k), 2, 8, generator=gen)
    cu_q, cu_k = _offsets(n_q), _offsets(n_k)
    sinks = torch.tensor([0.5, -1.0, 25.0, float("-inf")])
    out = prefill_attention(q, k, v, cu_q, cu_k, 0.4, window, cap, sinks=sinks)
    for b in range(len(n_q)):
        for j in range(n_q[b]):
            pos = n_k[b] - n_q[b] + j
            lo = 0 if window is None else max(0, pos - window + 1)
            keys = slice(int(cu_k[b]) + lo, int(cu_k[b]) + pos + 1)
            for h in range(4):
                expect = _direct(q[int(cu_q[b]) + j, h].double(), k[keys, h // 2].double(), v[keys, h // 2].double(),
                                 0.4, cap, None if h == 3 else float(sinks[h]))
                torch.testing.assert_close(out[int(cu_q[b]) + j, h].double(), expect, atol=1e-5, rtol=1e-5)


def test_prefill_last_query_equals_decode():
    """The last query of a prefill over gathered pages is the decode of that sequence (window, cap, sinks)."""
    gen = torch.Generator().manual_seed(33)
    q, k, v, table, lens, sinks = _random_decode(gen, [5, 16, 23])
    keys, values, cu_k = gather_kv(k, v, table, lens)
    cu_q = torch.arange(4, dtype=torch.int32)  # one query each: the last token
    pre = prefill_attention(q, keys, values, cu_q, cu_k, 0.25, 7, 3.0, sinks=sinks)
    dec = paged_decode(q, k, v, table, lens, 0.25, 7, 3.0, sinks=sinks)
    torch.testing.assert_close(pre, dec, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 30.0), (70, 5.0)])
def test_paged_decode_kernel_with_sinks_matches_reference(triton_backend, device, window, cap):
    gen = torch.Generator().manual_seed(34)
    lens = [1, 16, 17, 65, 0] if device == "cpu" else [1, 16, 17, 65, 0, 5000]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, table, seq_lens, sinks = _random_decode(gen, lens, block_size=16, head_dim=64, dtype=dtype,
                                                     device=device)
    for splits in (1, 3):  # one pass (the sink starts the softmax), split + merge (the merge adds it)
        out = torch.full_like(q, float("nan"))
        paged_decode_triton(q, k, v, table, seq_lens, 0.125, window, cap, num_splits=splits, out=out, sinks=sinks)
        ref = reference.paged_decode_reference(q, k, v, table, seq_lens, 0.125, window, cap, sinks=sinks,
                                               compute_dtype=torch.float64)
        tol = DECODE_TOL[dtype]
        torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
        assert torch.all(out[4] == 0)
        plain = paged_decode_triton(q, k, v, table, seq_lens, 0.125, window, cap, num_splits=splits)
        assert not torch.allclose(out[:4].float(), plain[:4].float(), atol=1e-3)  # the sinks do something


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_kernel_dominating_and_absent_sinks(triton_backend, device):
    gen = torch.Generator().manual_seed(35)
    q, k, v, table, seq_lens, _ = _random_decode(gen, [9, 40, 0], block_size=8, head_dim=32, device=device)
    big = torch.full((8,), 40.0, device=device)  # e^40 swamps every score: the output all but vanishes
    none = torch.full((8,), float("-inf"), device=device)  # -inf: exactly no sink
    for splits in (1, 2):
        plain = paged_decode_triton(q, k, v, table, seq_lens, 0.2, num_splits=splits)
        out = paged_decode_triton(q, k, v, table, seq_lens, 0.2, num_splits=splits, sinks=big)
        assert out.abs().max() < 1e-9 * plain.abs().max() + 1e-12
        out = paged_decode_triton(q, k, v, table, seq_lens, 0.2, num_splits=splits, sinks=none)
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_torch_backend_takes_sinks(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    gen = torch.Generator().manual_seed(36)
    q, k, v, table, lens, sinks = _random_decode(gen, [4, 11])
    out = torch.empty_like(q)
    assert paged_decode(q, k, v, table, lens, 0.5, sinks=sinks, out=out) is out
    torch.testing.assert_close(out, reference.paged_decode_reference(q, k, v, table, lens, 0.5, sinks=sinks))


_BAD_SINKS = [
    ([0.0] * 8, "sinks must be a float32 tensor \\[q_heads\\]=\\[8\\] or None, got list"),
    (torch.zeros(4), r"sinks shape \(4,\) must be \[q_heads\]=\(8,\)"),
    (torch.zeros(1, 8), r"sinks shape \(1, 8\) must be"),
    (torch.zeros(8, dtype=torch.float16), "sinks dtype torch.float16 must be float32: pass sinks.float()"),
    (torch.zeros(8, device="meta"), "sinks is on meta but q is on cpu"),
    (torch.tensor([0.0] * 7 + [float("nan")]), r"sinks\[7\]=nan is not a logit"),
    (torch.tensor([float("inf")] + [0.0] * 7), r"sinks\[0\]=inf is not a logit"),
]


@pytest.mark.parametrize("sinks,match", _BAD_SINKS)
def test_bad_sinks_are_refused(sinks, match):
    gen = torch.Generator().manual_seed(37)
    q, k, v, table, lens, _ = _random_decode(gen, [4, 11])
    out = torch.zeros_like(q)
    with pytest.raises(KernelError, match=match):
        paged_decode(q, k, v, table, lens, 0.5, sinks=sinks, out=out)
    assert torch.all(out == 0)  # nothing written
    keys, values, cu = gather_kv(k, v, table, lens)
    with pytest.raises(KernelError, match=match):
        prefill_attention(q, keys, values, torch.arange(3, dtype=torch.int32), cu, 0.5, sinks=sinks)


def _offsets(counts) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


def _packed(n_q=(2, 3), n_k=(4, 3)):
    q, k = torch.zeros(sum(n_q), 4, 8), torch.zeros(sum(n_k), 2, 8)
    return {"q": q, "k": k, "v": k.clone(), "cu_seqlens_q": _offsets(n_q), "cu_seqlens_k": _offsets(n_k), "scale": 1.0}


@pytest.mark.parametrize("change,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 2, 7])),
     "sequence 0 has 3 queries but 2 keys"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int32)), r"cu_seqlens_q=\[0, 2, 6\] must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([1, 4, 7], dtype=torch.int32)), r"cu_seqlens_k=\[1, 4, 7\] must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens_q has 2 offsets but cu_seqlens_k has 3"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 5.0])), "cu_seqlens_q must be int32 or int64"),
    (dict(q=torch.zeros(5, 3, 8)), "q_heads a multiple of kv_heads=2"),
    (dict(q=torch.zeros(5, 4, 8, dtype=torch.bfloat16)), "pass gather_kv\\(..., out_dtype=q.dtype\\)"),
    (dict(v=torch.zeros(7, 2, 4)), "must have the same shape and dtype"),
    (dict(k=torch.zeros(7, 2, 8, dtype=torch.float8_e4m3fn)), "dtype torch.float8_e4m3fn is not supported"),
    (dict(scale=float("nan")), "scale must be a finite float"),
    (dict(sliding_window=0), "sliding_window must be a positive int or None"),
    (dict(logit_soft_cap=-1.0), "logit_soft_cap must be a positive float or None"),
])
def test_prefill_attention_checks_every_argument(change, match):
    args = _packed()
    args.update(change)
    with pytest.raises(KernelError, match=match):
        prefill_attention(**args)
