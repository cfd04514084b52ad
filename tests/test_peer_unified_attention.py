"""The issue-15 benchmarks' peer, vLLM's Triton unified attention, agrees with kvpool's torch reference.

Runs the peer under Triton's interpreter on tiny batches (prefix + new tokens, decode rows, GQA, a window and a
soft cap), so a benchmark's "vs vLLM" ratio is known to time a kernel that computes the same attention, with the
argument mapping of ``benchmarks/peer_unified.py``. Skipped with its reason when ``.peers/`` lacks the fetched
kernel (``python ../shared/peers/vllm_unified_attention.py fetch`` from the repository root).

bf16 is not checked here: under triton 3.6's interpreter the peer's bf16 output is garbage (|out| ~ 1e8; its
``tl.dot`` on bf16 tiles), while fp16 and fp32 agree with the reference; on a GPU the benchmarks check the
bf16 runs against kvpool and SDPA before timing them.
"""
import sys
from pathlib import Path

import pytest
import torch
from kernels_util import INTERPRET

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_cases as cases
import peer_unified

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not INTERPRET,
                                reason="CPU check of the peer under TRITON_INTERPRET=1 (GPUs: benchmarks/bench_*.py)")

# (q_lens, ctx_lens, q/kv heads, head_dim, dtype, window, soft cap, tolerance of ||out - ref|| / ||ref||)
CASES = [
    ([5, 33], [20, 33], (4, 2), 64, torch.float32, None, None, 1e-5),
    ([1, 7, 1], [40, 23, 16], (8, 1), 64, torch.float16, None, None, 2e-3),
    ([9, 1], [37, 50], (4, 4), 128, torch.float32, 12, 5.0, 1e-5),
]


@pytest.fixture(scope="module")
def unified_attention():
    fn, why = peer_unified.load_unified_attention()
    if fn is None:
        pytest.skip(why)
    return fn


@pytest.mark.parametrize("q_lens,ctx_lens,heads,head_dim,dtype,window,cap,tol", CASES,
                         ids=["prefix-fp32", "decode-gqa8-fp16", "window-softcap"])
def test_peer_matches_kvpool_reference(unified_attention, q_lens, ctx_lens, heads, head_dim, dtype, window, cap, tol):
    case = cases.make_case(q_lens, ctx_lens, *heads, head_dim, 16, dtype=dtype, device="cpu", seed=len(q_lens))
    out = torch.full_like(case.q, float("nan"))  # every row must be written
    peer_unified.call_unified(unified_attention, case, out, sliding_window=window, logit_soft_cap=cap)
    assert cases.rel_err(out, cases.reference(case, window, cap)) < tol


def test_missing_peer_gives_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOOL_PEERS_DIR", str(tmp_path))
    fn, why = peer_unified.load_unified_attention()
    assert fn is None and str(tmp_path) in why and "fetch" in why
