"""benchmarks/bench_vmm.py runs end to end on CPU (the host backend, small sizes), so its own code (setup,
rounds, the memory check, the report lines) fails here rather than on a GPU machine whose time is counted."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_vmm_smoke_runs_every_case_on_the_host_backend():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           str(ROOT / "benchmarks" / "bench_vmm.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[host]")]
    assert sum("grow by" in line for line in lines) == 4 and sum("wake of" in line for line in lines) == 2
