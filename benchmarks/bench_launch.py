"""Host overhead of the eager paged_decode (and write_kv) wrapper on CPU, the kernel launches stubbed (issue 15 item 3).

The Triton kernels are replaced by no-op stand-ins, so what is timed is kvpool's Python: checks, launch
planning, output/scratch allocation. Target: <= 10 us per call above the kernel (the stub costs ~0.1 us).
Each case is timed three ways in one run, on one machine:

- ``cached``: this tree, the same tensors every call (a decode loop): the remembered proof and plan.
- ``checked``: this tree with the proof cache off: every check and the plan run on each call.
- ``before``: the wrapper of another source tree (``--baseline-src``, e.g. ``/work/main/src`` before the
  change), in a subprocess with the same stubs.

Run: ``python benchmarks/bench_launch.py [--baseline-src DIR]`` (prints a table), or under pytest
(``pytest benchmarks/bench_launch.py``: pytest-benchmark timings of ``cached`` and ``checked``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit

os.environ["KVPOOL_KERNELS"] = "triton"    # the Triton path on CPU tensors ...
os.environ["TRITON_INTERPRET"] = "1"       # ... which needs the interpreter flag (nothing is launched)
os.environ.pop("KVPOOL_DEBUG", None)

import pytest
import torch

# name -> (batch, q_heads, kv_heads): CPU plans assume 4 SMs, so 8 programs or more is one pass
CASES = {"one-pass b8 32/8": (8, 32, 8), "split b1 8/1": (1, 8, 1)}
HEAD_DIM, BLOCK, BLOCKS_PER_SEQ = 128, 16, 64
WRITE_CASE = "write_kv b8 kv8"


class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` does nothing but count."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


def stub_launches():
    """Replace the decode, merge and write kernels by stubs; returns the first two."""
    from kvpool.kernels import decode, write
    decode._paged_decode_kernel, decode._merge_splits_kernel = _StubKernel(), _StubKernel()
    write._write_kv_kernel = _StubKernel()
    return decode._paged_decode_kernel, decode._merge_splits_kernel


def decode_args(batch: int, q_heads: int, kv_heads: int):
    """bf16 decode tensors on CPU: q, K/V pages, a block table and lengths (4K context)."""
    num_blocks = batch * BLOCKS_PER_SEQ
    q = torch.randn(batch, q_heads, HEAD_DIM, dtype=torch.bfloat16)
    k = torch.zeros(num_blocks, BLOCK, kv_heads, HEAD_DIM, dtype=torch.bfloat16)
    table = torch.arange(num_blocks, dtype=torch.int32).view(batch, BLOCKS_PER_SEQ)
    lens = torch.full((batch,), BLOCKS_PER_SEQ * BLOCK, dtype=torch.int32)
    return q, k, k.clone(), table, lens


def time_us(fn, number: int = 3000, repeat: int = 5) -> float:
    """Best-of-``repeat`` mean microseconds per call."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def measure(cache_on: bool) -> dict:
    """Microseconds per paged_decode call for each case; the proof cache on or off (if this tree has one)."""
    from kvpool.kernels import api, paged_decode
    stub_launches()
    proofs = getattr(api, "_DECODE_PROOFS", None)
    if proofs is not None:
        proofs.enabled = cache_on
    write_proofs = getattr(api, "_WRITE_PROOFS", None)
    if write_proofs is not None:
        write_proofs.enabled = cache_on
    results = {}
    for name, shape in CASES.items():
        q, k, v, table, lens = decode_args(*shape)
        out = torch.empty_like(q)
        results[name] = time_us(lambda q=q, k=k, v=v, table=table, lens=lens, out=out:
                                paged_decode(q, k, v, table, lens, 0.088, out=out))
    q, k, v, table, lens = decode_args(8, 32, 8)
    new, slots = torch.randn(8, 8, HEAD_DIM, dtype=torch.bfloat16), table[:, 0].to(torch.int64) * BLOCK
    results[WRITE_CASE] = time_us(lambda: api.write_kv(new, new, k, v, slots))
    return results


def _baseline(src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_launch; " \
           "print(json.dumps(bench_launch.measure(True)))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", help="src/ folder of the wrapper to compare with (before the change)")
    args = parser.parse_args()
    stub = time_us(_StubKernel()[None])
    columns = {"checked": measure(False), "cached": measure(True)}
    if args.baseline_src:
        columns = {"before": _baseline(args.baseline_src), **columns}
    print(f"paged_decode host time per call, launches stubbed (stub {stub:.2f} us), Python "
          f"{sys.version.split()[0]}, torch {torch.__version__}")
    print(f"{'case':<20}" + "".join(f"{c:>10}" for c in columns) + "   (us)")
    for name in [*CASES, WRITE_CASE]:
        print(f"{name:<20}" + "".join(f"{col[name]:>10.2f}" for col in columns.values()))


@pytest.mark.parametrize("cache_on", [False, True], ids=["checked", "cached"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_wrapper_host_time(benchmark, monkeypatch, case, cache_on):
    from kvpool.kernels import api, decode, paged_decode
    kernel, merge = _StubKernel(), _StubKernel()
    monkeypatch.setattr(decode, "_paged_decode_kernel", kernel)
    monkeypatch.setattr(decode, "_merge_splits_kernel", merge)
    api._DECODE_PROOFS.enabled = cache_on
    q, k, v, table, lens = decode_args(*CASES[case])
    out = torch.empty_like(q)
    try:
        benchmark(paged_decode, q, k, v, table, lens, 0.088, out=out)
    finally:
        api._DECODE_PROOFS.enabled = True
    assert kernel.launches > 0 and (merge.launches > 0) == (CASES[case][2] == 1)  # one pass: one launch


if __name__ == "__main__":
    main()
