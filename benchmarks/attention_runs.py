"""The contenders of the issue-15 attention benchmarks, checked against kvpool's reference, then timed side by side.

Not a test module. Each ``*_runner`` returns ``(run, output, None)`` (``run()`` writes ``output()``, a
``[num_new, q_heads, head_dim]`` tensor in ``q``'s row order) or ``(None, None, reason)`` when the contender is
not available here (kvpool's kernel not on this tree, the peer not fetched, SDPA without its flash backend).

``KVPOOL_BENCH_SMOKE=1`` (set by the CPU smoke, see ``bench_prefill.py``): tiny shapes on CPU tensors, Triton's
interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1`` and ``KVPOOL_KERNELS=triton`` before anything imports
triton), SDPA's math backend, and one wall-clock call instead of CUDA-event medians: the figures mean nothing,
the code paths and the correctness checks run.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from attention_cases import dense_copy, reference, rel_err, select
from kernel_bench_util import median_ms
from peer_unified import call_unified, load_unified_attention

SMOKE = os.environ.get("KVPOOL_BENCH_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
# ||out - ref|| / ||ref|| of bf16/fp16 outputs against the float32 reference (METHOD.md: bf16 lands 1e-3..1e-2)
TOL = 1e-2


def kvpool_kernel(name: str):
    """``(kvpool.<name>, None)`` or ``(None, reason)`` when this tree does not export it yet."""
    import kvpool
    fn = getattr(kvpool, name, None)
    return (fn, None) if fn is not None else (None, f"kvpool.{name} is not exported by this tree (issue 15 item 1-2)")


def ours_runner(name: str, case):
    """kvpool's ``paged_prefill`` or ``paged_attention`` on the case, into a preallocated ``out``."""
    fn, why = kvpool_kernel(name)
    if fn is None:
        return None, None, why
    out = torch.full_like(case.q, float("nan"))
    args = case.kvpool_args()
    return (lambda: fn(*args, out=out)), (lambda: out), None


def vllm_runner(case):
    """vLLM's unified attention on the same pages, table and lengths."""
    fn, why = load_unified_attention()
    if fn is None:
        return None, None, why
    out = torch.full_like(case.q, float("nan"))
    return (lambda: call_unified(fn, case, out)), (lambda: out), None


def sdpa_runner(case):
    """``F.scaled_dot_product_attention`` on the same tokens in a contiguous cache: the flash backend on CUDA
    (causal aligned bottom-right when ``q_len < ctx_len``, as a chunk after a cached prefix), math on CPU.

    Returns ``(run, output, backend)``; ``run`` is None and ``backend`` the reason when flash cannot run it.
    """
    from torch.backends.cuda import SDPAParams, can_use_flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = dense_copy(case)
    n, ctx = q.shape[2], k.shape[2]
    mask = None if n == ctx else causal_lower_right(n, ctx)
    if q.is_cuda and not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True), debug=True):
        return None, None, "SDPA skipped: the flash backend refuses this shape (warnings above say why)"
    backend = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    result = []

    def run():
        with sdpa_kernel(backend):
            result[:] = [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                        scale=case.scale, enable_gqa=True)]

    def output():
        return result[0].transpose(1, 2).reshape(case.q.shape)
    return run, output, "flash" if q.is_cuda else "math (cpu)"


def check(case, outputs: dict, seqs, last_q=None) -> dict:
    """``rel_err_<name>`` of each output against kvpool's float32 reference on the `select`-ed sub-batch
    (sequences ``seqs``, their last ``last_q`` queries): every output must be finite there and within `TOL`."""
    sub, rows = select(case, seqs, last_q)
    ref = reference(sub)
    errs = {}
    for name, out in outputs.items():
        errs[f"rel_err_{name}"] = rel_err(out[rows], ref)
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"outputs off kvpool's reference (tolerance {TOL}): {bad}"
    return errs


def smoke_ms(fn) -> float:
    """One wall-clock call in ms (the CPU smoke: interpreter timings are not figures)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_ms(fn) -> float:
    """Median CUDA-event time of ``fn()`` in ms (L2 flushed between calls), or one wall-clock call in the smoke."""
    return smoke_ms(fn) if SMOKE else median_ms(fn)


def run_all(runners: dict) -> tuple[dict, dict, dict]:
    """Call each available runner once (compiles, warms up); returns ``(runs, outputs, notes)``."""
    runs, outputs, notes = {}, {}, {}
    for name, (run, output, why) in runners.items():
        if run is None:
            notes[f"{name}_note"] = why
            continue
        run()
        runs[name], outputs[name] = run, output()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return runs, outputs, notes
