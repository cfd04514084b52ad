"""kvpool.paged_attention on a mixed batch (prefill chunks + decode rows in one call) against vLLM (issue 15).

Shape (the issue's target): 252 decode rows then 4 prefill chunks of 512 new tokens (vLLM's order: decodes
first), every sequence at a context drawn uniformly from 2,048-4,096 tokens (seeded), q/kv heads 32/8,
head_dim 128, bf16, block size 16, shuffled block tables. Target: **>= 1.1x vLLM's unified attention**
(``../shared/peers/vllm_unified_attention.py``, fetched into ``.peers/``; its 2-D launch, the one vLLM takes for a
batch with prefill rows). Also timed, for the record: kvpool's two calls a server would make without the mixed
kernel (``paged_decode`` on the decode rows, ``paged_prefill`` on the chunks, into the same output).

Every output is first checked against kvpool's float32 torch reference on 8 decode rows and the 4 chunks.
GB/s = K+V bytes of the batch / time (the batch is bound by reading the cache: compare with the copy ceiling).

    python -m pytest benchmarks/bench_mixed.py -s                           # a GPU, .peers/ fetched
    KVPOOL_BENCH_SMOKE=1 python -m pytest benchmarks/bench_mixed.py -s      # CPU smoke: tiny shapes, interpreter
"""
import random

import pytest
import torch
from attention_cases import PagedCase, make_case
from attention_runs import (
    DEVICE,
    SMOKE,
    check,
    kvpool_kernel,
    ours_runner,
    run_all,
    time_ms,
    vllm_runner,
)
from kernel_bench_util import HAS_CUDA

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA and not SMOKE,
                                 reason="GPU benchmark: needs a CUDA device (KVPOOL_BENCH_SMOKE=1: the CPU smoke)")]

# decode rows, prefill chunks, chunk tokens, context range, (q_heads, kv_heads), head_dim
SHAPE = (3, 1, 8, (17, 40), (4, 2), 64) if SMOKE else (252, 4, 512, (2048, 4096), (32, 8), 128)
BLOCK = 16
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # the interpreter's tl.dot is wrong on bf16 tiles
TARGET_VS_VLLM = 1.1


def mixed_case() -> PagedCase:
    n_dec, n_pre, chunk, (lo, hi), (q_heads, kv_heads), head_dim = SHAPE
    rng = random.Random(15)
    ctx = [rng.randint(lo, hi) for _ in range(n_dec + n_pre)]
    return make_case([1] * n_dec + [chunk] * n_pre, ctx, q_heads, kv_heads, head_dim, BLOCK, DTYPE, DEVICE)


def _rows(case: PagedCase, start: int, stop: int) -> PagedCase:
    """Sequences ``start:stop`` as a case whose q (and so its output rows) are views of the full batch's."""
    qsl = case.query_start_loc[start:stop + 1]
    q0, q1 = int(qsl[0]), int(qsl[-1])
    return PagedCase(case.q[q0:q1], case.k_cache, case.v_cache, case.block_table[start:stop], qsl - q0,
                     case.seq_lens[start:stop], case.q_lens[start:stop], case.ctx_lens[start:stop], case.scale)


def two_calls_runner(case: PagedCase, n_dec: int):
    """``paged_decode`` on the decode rows + ``paged_prefill`` on the chunks, writing one output."""
    (decode, why), (prefill, why2) = kvpool_kernel("paged_decode"), kvpool_kernel("paged_prefill")
    if decode is None or prefill is None:
        return None, None, why or why2
    dec, pre = _rows(case, 0, n_dec), _rows(case, n_dec, len(case.q_lens))
    out = torch.full_like(case.q, float("nan"))
    out_dec, out_pre = out[:dec.q.shape[0]], out[dec.q.shape[0]:]

    def run():
        decode(dec.q, dec.k_cache, dec.v_cache, dec.block_table, dec.seq_lens, dec.scale, out=out_dec)
        prefill(*pre.kvpool_args(), out=out_pre)
    return run, (lambda: out), None


def test_mixed_batch(record):
    """252 decode rows + 4 chunks of 512 at 2-4K context: one kvpool call vs vLLM (>= 1.1x)."""
    n_dec, n_pre, chunk, (lo, hi), (q_heads, kv_heads), head_dim = SHAPE
    case = mixed_case()
    row = {"kind": "paged_attention_mixed", "name": f"mixed {n_dec} decode + {n_pre}x{chunk} prefill ctx {lo}-{hi} "
                                                    f"h{q_heads}/{kv_heads} d{head_dim}",
           "decode_rows": n_dec, "prefill_chunks": n_pre, "chunk": chunk, "ctx_lo": lo, "ctx_hi": hi,
           "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "block_size": BLOCK,
           "dtype": str(DTYPE).removeprefix("torch."), "kv_gb": case.kv_bytes() / 1e9, "tflop": case.flops() / 1e12,
           "target_vs_vllm": TARGET_VS_VLLM}
    runners = {"ours": ours_runner("paged_attention", case), "vllm": vllm_runner(case),
               "two_calls": two_calls_runner(case, n_dec)}
    runs, outputs, notes = run_all(runners)
    row.update(notes)
    row.update(check(case, outputs, [*range(min(8, n_dec)), *range(n_dec, n_dec + n_pre)]))
    for name, run in runs.items():
        row[f"{name}_ms"] = time_ms(run)
        row[f"{name}_gbps"] = case.kv_bytes() / (row[f"{name}_ms"] * 1e-3) / 1e9
    for other in ("vllm", "two_calls"):
        if "ours_ms" in row and f"{other}_ms" in row:
            row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["ours_ms"]
    record(row, runs.get("ours") or next(iter(runs.values())))
    if "ours_note" in row:
        pytest.skip(row["ours_note"])
