"""Helpers of the GPU kernel benchmarks (imported by conftest.py and the bench_*.py files)."""
import sys
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
sys.path.insert(0, str(Path(__file__).parent))


def median_ms(fn, warmup_ms: int = 10, rep_ms: int = 60) -> float:
    """Median time of ``fn()`` in ms: CUDA events around each call, L2 cache flushed in between."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_median_ms(fn, rep_ms: int = 40) -> float:
    """GPU time of one ``fn()`` in ms, launch overhead excluded: median over replays of a CUDA graph
    holding many unrolled calls (as a server replays its captured decode step). Inputs stay in L2
    between calls, so this favours shapes that fit it; compare kernels with it, not with the roofline."""
    import triton.testing
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
