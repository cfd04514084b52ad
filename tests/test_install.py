"""A plain ``pip install kvpool`` (no torch, triton, transformers or tqdm) and a machine without CUDA:
every entry point that needs what is missing says so in one clear KVPoolError naming the extra to
install or the device to use, never a bare ModuleNotFoundError or torch's AssertionError.

The missing modules are simulated, not uninstalled: a subprocess gets a ``sitecustomize`` that sets
``sys.modules[name] = None`` for each blocked name, so ``import name`` raises ModuleNotFoundError
exactly as on a machine without it (spawned demo ranks inherit it through PYTHONPATH).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kvpool
from kvpool.errors import InvalidArgumentError, MissingDependencyError

BLOCKER = """\
import os, sys
for _name in os.environ.get("KVPOOL_TEST_BLOCK", "").split(","):
    if _name:
        sys.modules[_name] = None  # 'import _name' now raises ModuleNotFoundError(name=_name)
"""
TORCH_ENTRY_POINTS = ["PagedKVCache", "BlockTables", "write_kv", "gather_kv", "copy_blocks", "paged_decode",
                      "size_kv_pool", "PoolSize"]
# a CUDA device that is not there: any CUDA device on a CPU machine, one past the last on a GPU machine
ABSENT_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def blocker_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blocker")
    (path / "sitecustomize.py").write_text(BLOCKER)
    return path


def run_without(blocker_dir, blocked, args, timeout=240):
    """Run ``python ARGS`` where importing any module in ``blocked`` fails; return the CompletedProcess."""
    env = dict(os.environ, KVPOOL_TEST_BLOCK=",".join(blocked),
               PYTHONPATH=os.pathsep.join([str(blocker_dir), os.environ.get("PYTHONPATH", "")]))
    env.pop("KVPOOL_KERNELS", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_torch_entry_point_names_the_gpu_extra(blocker_dir):
    code = textwrap.dedent(f"""
        import json, kvpool
        out = {{}}
        for name in {TORCH_ENTRY_POINTS!r}:
            try:
                getattr(kvpool, name)
                out[name] = "loaded"
            except Exception as err:
                out[name] = [type(err).__name__, isinstance(err, kvpool.KVPoolError),
                             isinstance(err, ImportError), str(err)]
        try:
            from kvpool import PagedKVCache
        except Exception as err:
            out["from kvpool import PagedKVCache"] = [type(err).__name__, isinstance(err, kvpool.KVPoolError),
                                                      isinstance(err, ImportError), str(err)]
        print(json.dumps(out))
    """)
    proc = run_without(blocker_dir, ["torch"], ["-c", code])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert set(results) == {*TORCH_ENTRY_POINTS, "from kvpool import PagedKVCache"}
    for name, result in results.items():
        kind, is_kvpool_error, is_import_error, message = result
        assert (kind, is_kvpool_error, is_import_error) == ("MissingDependencyError", True, True), (name, result)
        assert "needs torch, which is not installed" in message and 'pip install "kvpool[gpu]"' in message, name


def test_planner_allocator_and_metrics_work_without_torch(blocker_dir):
    code = textwrap.dedent("""
        import kvpool
        from kvpool.metrics import PoolMetrics
        plan = kvpool.plan_memory("llama-3.1-8b", tp=1, gpu="a100-80gb")
        a = kvpool.BlockAllocator(8, block_size=16)
        m = PoolMetrics()
        m.observe_allocator(a)
        print(plan.num_blocks > 0, len(a.allocate(3)), b"kvpool_blocks_total 8.0" in m.exposition())
    """)
    proc = run_without(blocker_dir, ["torch", "triton", "transformers", "tqdm"], ["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "3", "True"]


def test_triton_kernels_without_triton_name_the_gpu_extra(blocker_dir):
    code = textwrap.dedent("""
        import os, torch, kvpool
        os.environ.update(KVPOOL_KERNELS="triton", TRITON_INTERPRET="1")  # take the Triton path on CPU
        k_cache = torch.zeros(4, 16, 2, 8)
        key = torch.ones(3, 2, 8)
        try:
            kvpool.write_kv(key, key, k_cache, k_cache.clone(), torch.arange(3, dtype=torch.int32))
        except Exception as err:
            print(type(err).__name__, isinstance(err, kvpool.KVPoolError), err)
    """)
    proc = run_without(blocker_dir, ["triton"], ["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MissingDependencyError True "), proc.stdout
    assert "needs triton, which is not installed" in proc.stdout and 'pip install "kvpool[gpu]"' in proc.stdout


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_demo_without_torch_names_the_demo_extra(blocker_dir):
    proc = run_without(blocker_dir, ["torch"], ["-m", "kvpool.demo", "--requests", "2"])
    _assert_one_line_error(proc, "python -m kvpool.demo needs torch", 'pip install "kvpool[demo]"')


def test_demo_check_hf_without_transformers_refuses_before_running(blocker_dir):
    proc = run_without(blocker_dir, ["transformers"], ["-m", "kvpool.demo", "--requests", "2", "--check-hf"])
    _assert_one_line_error(proc, "--check-hf needs transformers", 'pip install "kvpool[demo]"')
    assert proc.stdout == ""  # refused before serving anything


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_demo_without_tqdm_runs_without_a_progress_bar(blocker_dir, tp):
    # tp=2 used to die: rank 0 failed importing tqdm, rank 1 then saw gloo's "connection closed"
    proc = run_without(blocker_dir, ["tqdm"], ["-m", "kvpool.demo", "--requests", "3", "--tp", str(tp)])
    assert proc.returncode == 0, proc.stderr
    assert "3 finished, 0 refused" in proc.stdout
    assert "requests:" not in proc.stderr  # no bar drawn


# ----------------------------------------------------------------- a CUDA device that is not there
def test_cache_on_an_absent_cuda_device_is_one_clear_error():
    with pytest.raises(InvalidArgumentError, match=r"no CUDA device is visible|CUDA device\(s\) are visible"):
        kvpool.PagedKVCache.for_shard("llama-3.1-8b", 4, 16, 0, 1, ABSENT_CUDA)
    with pytest.raises(InvalidArgumentError, match="'cdua' is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'"):
        kvpool.PagedKVCache.for_shard("llama-3.1-8b", 4, 16, 0, 1, "cdua")


def test_block_tables_on_an_absent_cuda_device_is_one_clear_error():
    allocator = kvpool.BlockAllocator(8, block_size=16)
    with pytest.raises(InvalidArgumentError, match=r"no CUDA device is visible|CUDA device\(s\) are visible"):
        kvpool.BlockTables(allocator, 16, ABSENT_CUDA)
    assert allocator.num_free_blocks == 8


def test_demo_on_an_absent_cuda_device_is_one_line(capsys):
    from kvpool.demo.__main__ import main

    assert main(["--device", ABSENT_CUDA, "--requests", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kvpool demo: device='{ABSENT_CUDA}' but "), err
    assert "pass device='cpu'" in err[0] or "pass an index below" in err[0]


def test_missing_dependency_error_is_a_kvpool_error_and_an_import_error():
    assert issubclass(MissingDependencyError, kvpool.KVPoolError)
    assert issubclass(MissingDependencyError, ImportError)
    assert kvpool.MissingDependencyError is MissingDependencyError


def test_size_kv_pool_on_an_absent_cuda_device_is_the_same_clear_error():
    """size_kv_pool checks device= with the one rule the cache and the tables use (index range included)."""
    with pytest.raises(InvalidArgumentError, match=r"no CUDA device is visible|CUDA device\(s\) are visible"):
        kvpool.size_kv_pool("llama-3.1-8b", device=ABSENT_CUDA, device_memory_bytes=80 << 30)
    with pytest.raises(InvalidArgumentError, match="'cdua' is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'"):
        kvpool.size_kv_pool("llama-3.1-8b", device="cdua", device_memory_bytes=80 << 30)
