"""``benchmarks/sanitize_kernels.py --run`` (the child compute-sanitizer runs on a GPU) runs on CPU under the
interpreter and every result check passes, so the GPU check's memcheck stage fails only for a real memory error.

Regression: its copy-on-write case copied table blocks onto ids ``num_blocks - 1`` / ``num_blocks - 2``, which the
shuffled tables could also hold; since copy_blocks refuses a destination that is also a source (#9 item 10) the
script stopped there with BlockIndexError, before memcheck saw the decode kernels or the new attention calls.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # every kernel interpreted, the attention calls too: 10-40 s on 2 shared cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs this script under compute-sanitizer")
def test_sanitize_kernels_runs_on_cpu():
    env = dict(os.environ, KVPOOL_SANITIZE_DEVICE="cpu", TRITON_INTERPRET="1", KVPOOL_KERNELS="triton")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sanitize_kernels.py"), "--run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "0 wrong" in proc.stdout
