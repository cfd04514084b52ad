"""paged_prefill (Triton, interpreted on CPU) against its float64 torch reference, and the reference against
two independent oracles (gather_kv + prefill_attention_reference; paged_decode_reference for 1-token rows).

One case per axis rather than the full cross product (the interpreter is slow): every cache dtype (fp8 per
head, per token and head, per tensor), GQA 1/2/3/4/8, head_dim 64/80/128/256, block sizes 1/16/32, chunks
whose first position is not block-aligned, 1-token rows, sequences with no new tokens, query and key tiles
that span several tiles, windows, soft caps, sinks, bidirectional chunks. Outputs are NaN-poisoned first.
"""
import pytest
import torch
from kernels_util import DECODE_TOL, DEVICES, FP8, compute_dtype, device_cases, new_cache, random_tables
from kernels_util import triton_backend  # noqa: F401  (fixture)

from kvpool.kernels import paged_prefill, reference
from kvpool.kernels.paged_prefill_kernel import paged_prefill_triton

# (seq_len, new tokens): a whole prompt, a chunk starting mid-block, a decode row, a chunk over two key tiles,
# an empty sequence, a sequence with no new tokens this step
SHAPES = [(5, 5), (37, 9), (20, 1), (70, 66), (0, 0), (17, 0)]
CUDA_SHAPES = [(1024, 1024), (5000, 1000), (300, 1), (4096 + 17, 513), (0, 0), (64, 0), (2000, 1999)]


def batch(shapes, block_size, kv_heads, group, head_dim, dtype, scale_kind, device, seed=0):
    """Pages, tables and queries of a batch of ``(seq_len, new_tokens)`` sequences."""
    gen = torch.Generator().manual_seed(seed)
    lens = [n for n, _ in shapes]
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    k, v, ks, vs = new_cache(num_blocks, block_size, kv_heads, head_dim, dtype, scale_kind, device, gen)
    if scale_kind == "tensor":
        ks, vs = (torch.tensor([0.03], device=device).expand(kv_heads) for _ in range(2))
    table, seq_lens = random_tables(lens, block_size, num_blocks, device, gen)
    qsl = torch.tensor([0] + [sum(q for _, q in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32,
                       device=device)
    q = torch.randn(int(qsl[-1]), kv_heads * group, head_dim, generator=gen).to(device, compute_dtype(dtype))
    return q, k, v, table, qsl, seq_lens, ks, vs


def check(out, q, k, v, table, qsl, lens, scale, causal=True, window=None, cap=None, ks=None, vs=None, sinks=None):
    ref = reference.paged_prefill_reference(q, k, v, table, qsl, lens, scale, causal, window, cap, ks, vs, sinks,
                                            compute_dtype=torch.float64)
    tol = DECODE_TOL[q.dtype]
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)


def run(q, k, v, table, qsl, lens, scale, **options):
    out = torch.full_like(q, float("nan"))
    result = paged_prefill(q, k, v, table, qsl, lens, scale, out=out, **options)
    assert result is out
    return out


# (cache dtype, fp8 scale kind, q heads per kv head, head_dim, block_size, kv_heads)
CASES = [
    (torch.float32, None, 1, 64, 16, 2),
    (torch.float16, None, 4, 80, 1, 2),
    (torch.bfloat16, None, 8, 128, 32, 1),
    (torch.float16, None, 2, 256, 32, 1),  # 32-key tiles inside 32-token pages: one block id per tile
    (FP8, "head", 4, 64, 16, 2),
    (FP8, "token_head", 3, 80, 32, 1),
    (FP8, "tensor", 2, 64, 1, 2),
]
CUDA_CASES = [(torch.bfloat16, None, 4, 128, 16, 8), (torch.float16, None, 8, 80, 32, 4),
              (FP8, "token_head", 4, 128, 16, 8), (torch.bfloat16, None, 1, 256, 16, 4)]


@pytest.mark.parametrize("device,dtype,scale_kind,group,head_dim,block_size,kv_heads",
                         device_cases(CASES, CUDA_CASES))
def test_paged_prefill_matches_reference(triton_backend, device, dtype, scale_kind, group, head_dim, block_size,
                                         kv_heads):
    shapes = SHAPES if device == "cpu" else CUDA_SHAPES
    q, k, v, table, qsl, lens, ks, vs = batch(shapes, block_size, kv_heads, group, head_dim, dtype, scale_kind,
                                              device)
    scale = head_dim ** -0.5
    out = run(q, k, v, table, qsl, lens, scale, k_scale=ks, v_scale=vs)
    check(out, q, k, v, table, qsl, lens, scale, ks=ks, vs=vs)


# (window, soft cap, causal, sinks): lower window edges inside and across key tiles, a 1-token window
OPTIONS = [(1, None, True, False), (7, 20.0, True, False), (64, None, True, True), (None, 5.0, False, False),
           (None, None, False, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,cap,causal,with_sinks", OPTIONS)
def test_paged_prefill_window_cap_sinks_bidirectional(triton_backend, device, window, cap, causal, with_sinks):
    shapes = [(130, 130), (150, 40), (9, 2), (70, 1)] if device == "cpu" else [(4000, 3000), (9000, 700), (70, 1)]
    q, k, v, table, qsl, lens, _, _ = batch(shapes, 16, 2, 2, 64, torch.bfloat16, None, device, seed=3)
    q = q * 4  # peaked softmaxes: a misplaced mask shows
    sinks = torch.linspace(-2.0, 3.0, q.shape[1], device=device) if with_sinks else None
    out = run(q, k, v, table, qsl, lens, 0.125, causal=causal, sliding_window=window, logit_soft_cap=cap,
              sinks=sinks)
    check(out, q, k, v, table, qsl, lens, 0.125, causal, window, cap, sinks=sinks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_paged_prefill_never_reads_outside_the_window(triton_backend, device, block_size):
    """Positions below every query's window (a windowed group's released blocks) are never read: their table
    entries point at a page of NaNs and the output stays finite and equal to the reference's. Block size 1
    puts NaN pages inside the first key tile read (masked loads); 16 leaves a whole skipped tile before it."""
    q, k, v, table, qsl, lens, _, _ = batch([(100, 10)], block_size, 1, 2, 64, torch.float32, None, device, seed=4)
    poison = min(set(range(k.shape[0])) - set(table.flatten().tolist()))  # a spare block: fill it with NaN
    k[poison], v[poison] = float("nan"), float("nan")
    table[0, :71 // block_size] = poison  # the first query (position 90) with window 20 reads from 71 on
    out = run(q, k, v, table, qsl, lens, 0.125, sliding_window=20)
    check(out, q, k, v, table, qsl, lens, 0.125, window=20)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_prefill_clamps_unchecked_indices(triton_backend, device):
    """Called past the checks (as a CUDA call without KVPOOL_DEBUG), wrong block ids read a clamped block
    instead of memory outside the cache: the result equals the reference on the clamped table."""
    q, k, v, table, qsl, lens, _, _ = batch([(40, 8), (3, 3)], 16, 1, 2, 64, torch.float32, None, device, seed=5)
    bad = table.clone()
    bad[0, 1], bad[1, 0] = 10 ** 6, -7
    out = paged_prefill_triton(q, k, v, bad, qsl, lens, 0.125)
    clamped = bad.clamp(0, k.shape[0] - 1)
    check(out, q, k, v, clamped, qsl, lens, 0.125)


def test_reference_matches_gather_then_prefill_attention():
    """Independent oracle: gather every position, then `prefill_attention_reference` over the packed K/V."""
    q, k, v, table, qsl, lens, ks, vs = batch(SHAPES, 16, 2, 4, 64, FP8, "token_head", "cpu", seed=6)
    sinks = torch.randn(q.shape[1])
    for window, cap in ((None, None), (5, 10.0)):
        paged = reference.paged_prefill_reference(q.double(), k, v, table, qsl, lens, 0.2, True, window, cap, ks, vs,
                                                  sinks, compute_dtype=torch.float64)
        keys, values, cu = reference.gather_kv_reference(k, v, table, lens, ks, vs, out_dtype=torch.float64)
        dense = reference.prefill_attention_reference(q.double(), keys, values, qsl, cu, 0.2, window, cap, sinks,
                                                      compute_dtype=torch.float64)
        torch.testing.assert_close(paged, dense, atol=1e-6, rtol=1e-6)  # gather dequantizes in float32


def test_reference_one_token_rows_match_decode():
    """Independent oracle: one new token per sequence is a decode step."""
    q, k, v, table, qsl, lens, _, _ = batch([(5, 1), (40, 1), (1, 1)], 16, 2, 2, 64, torch.float32, None, "cpu")
    for window in (None, 3):
        paged = reference.paged_prefill_reference(q, k, v, table, qsl, lens, 0.2, True, window,
                                                  compute_dtype=torch.float64)
        decode = reference.paged_decode_reference(q, k, v, table, lens, 0.2, window, compute_dtype=torch.float64)
        torch.testing.assert_close(paged, decode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale_kind,window", [(torch.bfloat16, None, None), (FP8, "token_head", 24)])
def test_paged_attention_mixed_batch_is_one_tiled_launch(triton_backend, monkeypatch, device, dtype, scale_kind,
                                                         window):
    """Prefill chunks (one mid-block) and decode rows, in any order, in ONE launch of the tiled kernel."""
    from kvpool.kernels import mixed_batch, paged_attention, paged_prefill_kernel
    launches = []
    real_launch = paged_prefill_kernel.launch_prefill
    monkeypatch.setattr(paged_prefill_kernel, "launch_prefill", lambda *a: launches.append(1) or real_launch(*a))
    monkeypatch.setattr(mixed_batch, "paged_decode", None)  # the decode path must not run
    shapes = [(70, 1), (37, 9), (300, 1), (5, 5), (64, 1)]
    if device == "cuda":
        shapes = [(4000, 512)] * 4 + [(2000 + 7 * i, 1) for i in range(60)]
    q, k, v, table, qsl, lens, ks, vs = batch(shapes, 16, 2, 4, 64, dtype, scale_kind, device, seed=7)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k, v, table, qsl, lens, 0.125, sliding_window=window, k_scale=ks, v_scale=vs, out=out)
    assert launches == [1]
    check(out, q, k, v, table, qsl, lens, 0.125, window=window, ks=ks, vs=vs)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_decode_step_takes_split_k_decode(triton_backend, monkeypatch, device):
    """As many new tokens as sequences: the split-K decode kernel, the same result as paged_decode's."""
    from kvpool.kernels import paged_attention, paged_decode, paged_prefill_kernel
    monkeypatch.setattr(paged_prefill_kernel, "launch_prefill", None)  # the tiled path must not run
    q, k, v, table, qsl, lens, _, _ = batch([(70, 1), (1, 1), (300, 1)], 16, 2, 4, 64, torch.float16, None, device)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0] * 2, device=device)
    out = paged_attention(q, k, v, table, qsl, lens, 0.125, sliding_window=50, sinks=sinks)
    expected = paged_decode(q, k, v, table, lens, 0.125, 50, sinks=sinks)
    assert torch.equal(out, expected)
    check(out, q, k, v, table, qsl, lens, 0.125, window=50, sinks=sinks)
