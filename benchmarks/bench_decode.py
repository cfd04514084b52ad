"""paged_decode against torch SDPA (dense cache), vLLM's Triton decode kernel, and the roofline.

Shapes (issue 4): batch {1, 8, 64, 256} x context {512, 4096, 32768}, q/kv heads 32/8 and 64/8,
head_dim 128, bf16, block size 16, random (non-contiguous) block tables. Roofline = KV bytes
divided by the measured copy ceiling's bandwidth. Two timings per kernel: "eager", the median of
CUDA-event timings of single calls with the L2 cache flushed (``triton.testing.do_bench``; for small
shapes this is the host's launch path, Python wrapper included), and "graph", the median GPU time per
call over replays of a CUDA graph of unrolled calls (``do_bench_cudagraph``: no launch overhead, as a
server that captures its decode step sees it; L2 warm).

vLLM's kernel is loaded from ``.peers/`` (see ``../shared/peers/vllm_triton_decode.py``; never
committed) and called with ``num_kv_splits=8`` (SGLang's default for this kernel); the baseline is
skipped with its reason when the file is absent.
"""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_bench_util import HAS_CUDA, graph_median_ms, median_ms

from kvpool.kernels import paged_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")]

ROOT = Path(__file__).resolve().parent.parent
HEAD_DIM, BLOCK, KV_HEADS = 128, 16, 8
BATCHES, CONTEXTS, HEADS = (1, 8, 64, 256), (512, 4096, 32768), ((32, 8), (64, 8))
VLLM_SPLITS = 8
DENSE_LIMIT_BYTES = 20e9  # SDPA's dense copy beside the paged pool: skipped above this (256 x 32768)
DTYPE = torch.bfloat16


def _load_vllm():
    """vLLM's decode_attention_fwd and None, or None and the reason it is unavailable."""
    kernel = ROOT / ".peers" / "vllm_triton_decode_attention.py"
    if not kernel.exists():
        return None, f"vLLM baseline skipped: {kernel} is missing (run ../shared/peers/vllm_triton_decode.py fetch)"
    loaders = (ROOT / ".peers" / "vllm_triton_decode.py", ROOT.parent / "shared" / "peers" / "vllm_triton_decode.py")
    for loader in loaders:
        if loader.exists():
            spec = importlib.util.spec_from_file_location("vllm_triton_decode", loader)
            mod = importlib.util.module_from_spec(spec)
            sys.modules["vllm_triton_decode"] = mod
            spec.loader.exec_module(mod)
            return mod.load(kernel.parent), None
    # no loader beside it: the same two stand-ins the loader installs (vLLM's platform check, triton re-export)
    import triton
    import triton.language as tl
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_rocm=lambda: False)
    triton_utils = types.ModuleType("vllm.triton_utils")
    triton_utils.triton, triton_utils.tl = triton, tl
    for name, mod in {"vllm": types.ModuleType("vllm"), "vllm.platforms": platforms,
                      "vllm.triton_utils": triton_utils}.items():
        sys.modules.setdefault(name, mod)
    spec = importlib.util.spec_from_file_location("vllm_triton_decode_attention", kernel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.decode_attention_fwd, None


_VLLM = None


def _vllm():
    global _VLLM
    if _VLLM is None:
        try:
            _VLLM = _load_vllm()
        except Exception as e:  # a broken peer file must not stop our own figures
            _VLLM = (None, f"vLLM baseline failed to load: {type(e).__name__}: {e}")
    return _VLLM


@pytest.fixture(scope="module")
def pool():
    """One K and one V page pool big enough for the largest shape, filled once."""
    tokens = max(BATCHES) * max(CONTEXTS)
    free = torch.cuda.mem_get_info()[0]
    per_pool = tokens * KV_HEADS * HEAD_DIM * 2
    if 2 * per_pool > 0.8 * free:  # smaller GPU: the sweep drops the shapes that do not fit
        tokens = int(0.8 * free / (2 * KV_HEADS * HEAD_DIM * 2)) // BLOCK * BLOCK
    num_blocks = tokens // BLOCK
    k = torch.empty(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda").normal_()
    v = torch.empty_like(k).normal_()
    yield k, v
    del k, v
    torch.cuda.empty_cache()


@pytest.mark.parametrize("q_heads,kv_heads", HEADS, ids=["32-8", "64-8"])
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_paged_decode(record, copy_ceiling_gbps, pool, batch, context, q_heads, kv_heads):
    k_pool, v_pool = pool
    blocks_per_seq = context // BLOCK
    if batch * blocks_per_seq > k_pool.shape[0]:
        pytest.skip(f"{batch} x {context} tokens do not fit this GPU's memory beside the pool")
    table = torch.randperm(k_pool.shape[0], device="cuda")[:batch * blocks_per_seq].to(torch.int32)
    table = table.view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, q_heads, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM ** -0.5
    out = torch.empty_like(q)

    def ours():
        paged_decode(q, k_pool, v_pool, table, lens, scale, out=out)

    ours()
    kv_bytes = 2 * batch * context * kv_heads * HEAD_DIM * 2
    ms = median_ms(ours)
    graph_ms = graph_median_ms(ours)
    roofline_ms = kv_bytes / (copy_ceiling_gbps[0] * 1e9) * 1e3
    row = {"kind": "paged_decode", "name": f"decode b{batch} ctx{context} h{q_heads}/{kv_heads}",
           "batch": batch, "context": context, "q_heads": q_heads, "kv_heads": kv_heads, "ms": ms, "graph_ms": graph_ms,
           "gbps": kv_bytes / (ms * 1e-3) / 1e9, "roofline_ms": roofline_ms, "pct_roofline": 100 * roofline_ms / ms}

    # (b) vLLM's Triton decode kernel on the same pages and table
    vllm_fwd, why = _vllm()
    if vllm_fwd is None:
        row["vllm_note"] = why
    else:
        v_out = torch.empty_like(q)
        lse = torch.empty(batch, q_heads, dtype=torch.float32, device="cuda")
        logits = torch.empty(batch, q_heads, VLLM_SPLITS, HEAD_DIM + 1, dtype=torch.float32, device="cuda")
        one = torch.ones((), dtype=torch.float32, device="cuda")

        def vllm():
            vllm_fwd(q, k_pool, v_pool, v_out, lse, table, lens, logits, VLLM_SPLITS, scale, BLOCK,
                     0.0, one, one)
        vllm()
        row["max_diff_vs_vllm"] = float((out.float() - v_out.float()).abs().max())
        row["vllm_ms"] = median_ms(vllm)
        row["speedup_vs_vllm"] = row["vllm_ms"] / ms
        row["vllm_graph_ms"] = graph_median_ms(vllm)
        row["speedup_vs_vllm_graph"] = row["vllm_graph_ms"] / graph_ms

    # (a) torch SDPA on a dense contiguous cache of the same shape
    dense_bytes = kv_bytes
    if dense_bytes > DENSE_LIMIT_BYTES:
        row["sdpa_note"] = f"SDPA skipped: its dense {dense_bytes / 1e9:.0f} GB copy does not fit beside the pool"
    else:
        try:
            k_dense = torch.randn(batch, kv_heads, context, HEAD_DIM, dtype=DTYPE, device="cuda")
            v_dense = torch.randn_like(k_dense)
            q4 = q.unsqueeze(2)

            def sdpa():
                F.scaled_dot_product_attention(q4, k_dense, v_dense, scale=scale, enable_gqa=True)
            sdpa()
            row["sdpa_ms"] = median_ms(sdpa)
            row["speedup_vs_sdpa"] = row["sdpa_ms"] / ms
            del k_dense, v_dense
        except torch.cuda.OutOfMemoryError:
            row["sdpa_note"] = "SDPA skipped: out of memory for the dense copy"
    if batch >= 64 and context >= 4096:
        row["target_pct"] = 80.0
    record(row, ours)
    assert row.get("max_diff_vs_vllm", 0.0) < 2e-2, "paged_decode and vLLM's kernel disagree"
