"""size_kv_pool in one process: the arithmetic, the planner agreement, bad inputs, the CUDA measurement.

The multi-process (gloo) behaviour is in test_runtime_dist.py.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kvpool
from kvpool.errors import InvalidArgumentError, PlanError, ProfileError
from kvpool.plan import load_model_spec, plan_memory
from kvpool.plan.kv import kv_shard_layout
from kvpool.runtime import PoolSize, size_kv_pool
from kvpool.runtime.digest import describe_mismatch, digest, settings

GiB = 1024**3
MiB = 1024**2
ROOT = Path(__file__).resolve().parents[1]
# llama-3.1-8b at bf16: 32 layers x 8 KV heads x (K + V) x 128 x 2 bytes = 128 KiB per token
LLAMA8_BPT = 32 * 8 * 2 * 128 * 2


def _cpu(**kw) -> PoolSize:
    kw.setdefault("device", "cpu")
    spec = kw.pop("spec", "llama-3.1-8b")
    return size_kv_pool(spec, **kw)


# ----------------------------------------------------------------------------- arithmetic
def test_cpu_blocks_are_the_declared_budget_over_the_block_bytes():
    size = _cpu(device_memory_bytes=80 * GiB, in_use_bytes=15 * GiB, activation_bytes=2 * GiB,
                headroom=512 * MiB)
    budget = int(0.9 * 80 * GiB)
    kv = budget - 15 * GiB - 2 * GiB - 512 * MiB
    assert size.bytes_per_block == LLAMA8_BPT * 16
    assert size.num_blocks == kv // (LLAMA8_BPT * 16)
    assert size.num_tokens == size.num_blocks * 16
    assert size.kv_bytes == size.num_blocks * size.bytes_per_block
    assert (size.budget_bytes, size.kv_budget_bytes, size.headroom_bytes) == (budget, kv, 512 * MiB)
    assert (size.non_torch_bytes, size.nccl_bytes, size.measured, size.device) == (0, 0, False, "cpu")
    assert size.deciding_rank == 0 and len(size.ranks) == 1 and size.ranks[0].num_blocks == size.num_blocks


def test_headroom_as_a_fraction_of_total_memory():
    size = _cpu(device_memory_bytes=40 * GiB, headroom=0.05)
    assert size.headroom_bytes == int(0.05 * 40 * GiB)
    assert size.num_blocks == (int(0.9 * 40 * GiB) - int(0.05 * 40 * GiB)) // size.bytes_per_block


def test_fp8_tp_and_block_size_come_from_the_planner_layout():
    spec = load_model_spec("llama-3.1-70b")
    size = _cpu(spec=spec, device_memory_bytes=80 * GiB, in_use_bytes=36 * GiB, tp_size=4, tp_rank=3,
                kv_dtype="fp8", block_size=32)
    layout = kv_shard_layout(spec, tp=4, kv_dtype="fp8")
    assert size.bytes_per_block == layout.bytes_per_block(32) == 80 * 2 * 2 * (128 + 4) * 32
    assert size.ranks[0].tp_rank == 3 and size.tp_size == 4


def test_block_count_agrees_with_the_planner_given_the_same_terms():
    for tp, total, in_use, act, headroom in ((1, 80, 15, 1.5, 0.25), (2, 40, 7.5, 0.75, 0.0), (4, 24, 4, 0.5, 1)):
        spec = "llama-3.1-70b" if tp > 1 else "llama-3.1-8b"
        size = _cpu(spec=spec, device_memory_bytes=total * GiB, in_use_bytes=int(in_use * GiB),
                    activation_bytes=int(act * GiB), headroom=int(headroom * GiB), tp_size=tp, tp_rank=0)
        plan = plan_memory(spec, tp=tp, gpu_mem_gib=total, mem_fraction=0.9, weights_gib=in_use,
                           activation_gib=act, comm_gib=0.0, overhead_gib=0.0, headroom_gib=headroom).to_dict()
        assert size.num_blocks == plan["kv_cache"]["num_blocks"] > 0, (tp, total)
        assert size.bytes_per_block == plan["kv_cache"]["bytes_per_block_per_gpu"]
        assert abs(size.kv_budget_bytes / GiB - plan["per_gpu"]["kv_cache_gib"]) < 1e-4


def test_predicted_terms_are_the_planners_own_for_the_same_settings():
    size = _cpu(device_memory_bytes=80 * GiB, in_use_bytes=15 * GiB, activation_bytes=GiB)
    plan = plan_memory("llama-3.1-8b", tp=1, gpu_mem_gib=80.0, mem_fraction=0.9, cuda_graphs=False, max_seqs=256)
    p = size.predicted
    assert size.prediction_error is None
    assert p["num_blocks"] == plan.num_blocks
    assert p["weights_bytes"] == plan.term("weights").bytes  # the plan's bytes, not rebuilt from rounded GiB
    assert p["kv_bytes"] == plan.kv_cache.kv_bytes_per_gpu
    assert p["non_torch_bytes"] == p["comm_bytes"] + p["overhead_bytes"] + p["before_snapshot_bytes"]
    assert p["before_snapshot_bytes"] == plan.before_snapshot.bytes > 0  # the CUDA context at least
    rows = {r["term"]: r for r in size.comparison()}
    kv = rows["KV cache"]
    assert kv["measured_bytes"] == size.kv_budget_bytes
    assert kv["diff_bytes"] == p["kv_bytes"] - size.kv_budget_bytes
    assert kv["diff_pct"] == pytest.approx(100 * kv["diff_bytes"] / size.kv_budget_bytes)
    assert rows["bytes per block"]["diff_bytes"] == 0


def test_to_dict_is_json_and_the_table_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="kvpool.runtime"):
        size = _cpu(device_memory_bytes=80 * GiB, in_use_bytes=15 * GiB)
    d = json.loads(json.dumps(size.to_dict()))
    assert d["num_blocks"] == size.num_blocks and d["ranks"][0]["num_blocks"] == size.num_blocks
    assert [r["term"] for r in d["comparison"]][-2:] == ["blocks", "bytes per block"]
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "kvpool.runtime")
    assert f"{size.num_blocks} blocks x 16 tokens" in text and "KV cache" in text


def test_a_plan_that_cannot_be_made_is_reported_not_raised():
    size = _cpu(device_memory_bytes=GiB // 2, in_use_bytes=0)  # planner: the CUDA context alone fills it
    assert size.num_blocks > 0 and size.predicted is None
    assert size.prediction_error.startswith("PlanError")
    assert "no plan to compare with" in size.format_comparison()


def test_the_public_names_load_lazily():
    assert kvpool.size_kv_pool is size_kv_pool and kvpool.PoolSize is PoolSize


# ----------------------------------------------------------------------------- errors
def test_no_block_left_is_a_plan_error_with_the_figures():
    with pytest.raises(PlanError) as exc:
        _cpu(device_memory_bytes=16 * GiB, in_use_bytes=15 * GiB)
    msg = str(exc.value)
    assert "no KV block on this device" in msg and "14.40 GiB budget - 15.00 GiB torch in use" in msg
    assert "Raise mem_fraction" in msg


def test_cpu_without_device_memory_says_what_to_pass():
    with pytest.raises(InvalidArgumentError, match="device_memory_bytes="):
        _cpu()


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=12), "block_size must be a positive power of two"),
    (dict(block_size=0), "block_size"),
    (dict(mem_fraction=0.0), r"mem_fraction must be in \(0, 1\]"),
    (dict(mem_fraction=1.5), "mem_fraction"),
    (dict(headroom=-1), "headroom"),
    (dict(headroom=1.5), "headroom"),
    (dict(headroom=True), "headroom"),
    (dict(headroom=float("nan")), "headroom must be finite, got nan"),
    (dict(headroom=float("inf")), "headroom must be finite, got inf"),
    (dict(block_size=16.0), "block_size must be an integer"),
    (dict(block_size=True), "block_size must be an integer"),
    (dict(max_seqs=256.0), "max_seqs must be an integer"),
    (dict(device_memory_bytes=2**90), f"device_memory_bytes={2**90} is more than"),
    (dict(in_use_bytes=2**63), "in_use_bytes"),
    (dict(headroom=2**64), "headroom"),
    (dict(profile_fn=3), "profile_fn must be callable"),
    (dict(activation_bytes=-5), "activation_bytes must be a non-negative"),
    (dict(device_memory_bytes=0), "device_memory_bytes must be a positive"),
    (dict(tp_size=2, tp_rank=2), r"tp_rank must be in \[0, tp_size=2\)"),
    (dict(max_batched_tokens=0), "max_batched_tokens"),
    (dict(kv_dtype="int4"), "kv_dtype"),
    (dict(device="tpu"), "device"),
])
def test_bad_arguments_are_clear_errors(kw, match):
    kw.setdefault("device_memory_bytes", 80 * GiB)
    with pytest.raises(InvalidArgumentError, match=match):
        _cpu(**kw)


class _Sixteen:
    """Any object with ``__index__`` is an integer (as ``range`` and numpy take it)."""

    def __index__(self) -> int:
        return 16


@pytest.mark.parametrize("block_size", [np.int64(16), np.uint8(16), np.int32(16), _Sixteen()],
                         ids=["int64", "uint8", "int32", "__index__"])
def test_integer_types_are_integers(block_size):
    size = _cpu(device_memory_bytes=np.int64(80 * GiB), block_size=block_size, max_batched_tokens=np.int32(8192),
                max_seqs=np.int64(256), tp_size=np.int64(2), tp_rank=np.int16(1), in_use_bytes=np.uint64(GiB),
                headroom=np.int64(0))
    plain = _cpu(device_memory_bytes=80 * GiB, tp_size=2, tp_rank=1, in_use_bytes=GiB)
    assert type(size.block_size) is int and type(size.num_blocks) is int and size.block_size == 16
    assert size.digest == plain.digest and size.num_blocks == plain.num_blocks


def test_equal_settings_written_differently_have_one_digest():
    base = _cpu(device_memory_bytes=80 * GiB, headroom=0, kv_dtype="fp8")
    for kw in (dict(headroom=0.0), dict(headroom=-0.0), dict(headroom=np.float64(0.0)), dict(kv_dtype="FP8"),
               dict(kv_dtype="fp8_e4m3"), dict(mem_fraction=np.float64(0.9))):
        other = _cpu(device_memory_bytes=80 * GiB, **{"headroom": 0, "kv_dtype": "fp8", **kw})
        assert other.digest == base.digest, kw
        assert other.kv_dtype == "fp8" and other.headroom_bytes == 0
    auto = _cpu(device_memory_bytes=80 * GiB, kv_dtype="auto")  # llama-3.1-8b is a bf16 checkpoint
    assert auto.kv_dtype == "bf16" and auto.digest == _cpu(device_memory_bytes=80 * GiB, kv_dtype="BF16").digest
    assert _cpu(device_memory_bytes=80 * GiB, headroom=0.05).digest != base.digest  # a real difference stays one


def test_the_hash_key_is_128_random_bits_kept_out_of_logs():
    a, b = (_cpu(device_memory_bytes=80 * GiB) for _ in range(2))
    assert all(isinstance(k, int) and 0 <= k < 2**128 for k in (a.hash_key, b.hash_key))
    assert a.hash_key != b.hash_key
    assert str(a.hash_key) not in repr(a) and "hash_key" not in a.to_dict()


def test_a_keyboard_interrupt_in_profile_fn_is_re_raised_as_itself():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _cpu(device_memory_bytes=80 * GiB, profile_fn=interrupted)


@pytest.mark.parametrize("tp_ranks, tp_size, problem", [
    ([0, 1, 2, 3], 4, None),
    ([3, 1, 0, 2], 4, None),  # any order
    ([0, 1, 0, 1], 2, None),  # two replicas of tp=2
    ([3], 4, None),  # one process sizing one shard
    ([0, 0], 2, "tp_rank 0 is held by ranks 0 and 1, no rank holds tp_rank 1"),
    ([0, 1], 4, "no rank holds tp_rank 2 and 3"),
    ([0, 1, 1], 2, "3 ranks cannot hold each of the 2 tp_ranks equally often"),
    ([0, 0, 0, 1], 2, "tp_rank 0 is held by ranks 0, 1 and 2"),
])
def test_the_tp_ranks_of_a_group_must_cover_each_shard_equally(tp_ranks, tp_size, problem):
    from kvpool.runtime.tp_ranks import check_tp_ranks

    if problem is None:
        check_tp_ranks(tp_ranks, tp_size)
        return
    with pytest.raises(InvalidArgumentError, match=re.escape(problem)):
        check_tp_ranks(tp_ranks, tp_size)


def test_tp_not_dividing_the_heads_is_the_planners_error():
    with pytest.raises(kvpool.PlanError, match="tp=3 does not divide"):
        _cpu(device_memory_bytes=80 * GiB, tp_size=3)


def test_a_failing_profile_fn_is_a_profile_error_naming_the_cause():
    def boom():
        raise RuntimeError("CUDA out of memory (pretend)")

    with pytest.raises(ProfileError, match=r"rank 0: RuntimeError: CUDA out of memory \(pretend\)") as exc:
        _cpu(device_memory_bytes=80 * GiB, profile_fn=boom)
    assert isinstance(exc.value.__cause__, RuntimeError)


def test_profile_fn_runs_once_on_cpu():
    calls = []
    _cpu(device_memory_bytes=80 * GiB, profile_fn=lambda: calls.append(1))
    assert calls == [1]


# ----------------------------------------------------------------------------- digest
def test_the_digest_changes_with_any_setting_and_the_mismatch_names_it():
    spec = load_model_spec("llama-3.1-8b")
    other = load_model_spec({**json.loads((ROOT / "src/kvpool/plan/presets/llama-3.1-8b.json").read_text()),
                             "num_key_value_heads": 4})
    a = settings(spec, block_size=16, kv_dtype="auto")
    assert digest(a) == digest(settings(spec, block_size=16, kv_dtype="auto"))
    b = settings(spec, block_size=32, kv_dtype="auto")
    c = settings(other, block_size=16, kv_dtype="auto")
    assert len({digest(a), digest(b), digest(c)}) == 3
    ranks = [{"digest": digest(s), "settings": s} for s in (a, a, b, c)]
    msg = describe_mismatch(ranks, [0, 1, 2, 3])
    assert "rank 2 differs from rank 0 on block_size: 32 vs 16" in msg
    rank3 = msg.split("rank 3 differs from rank 0 on ")[1]
    assert "spec.num_kv_heads: 4 vs 8" in rank3 and "block_size" not in rank3.split(";")[0]
    assert "rank 0, rank 1 agree" in msg
    assert describe_mismatch(ranks[:2], [0, 1]) is None


# ----------------------------------------------------------------------------- the GPU script, on the CPU
@pytest.mark.slow
def test_gpu_validate_dry_run_writes_its_json(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_validate.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_validate.json").read_text())
    assert all(s["ok"] for s in report["stages"].values()), report["stages"]
    dec = report["stages"]["decode_step"]
    assert dec["blocks_covered"] > report["pool_size"]["num_blocks"] - dec["batch"]
    assert dec["max_abs_err_vs_fp32"] < 2e-2
    assert report["stages"]["allocate_pool"]["memory_bytes"] == report["pool_size"]["kv_bytes"]
    assert "KV cache" in proc.stdout.splitlines()[-4]


def test_gpu_validate_table_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_validate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    size = _cpu(device_memory_bytes=80 * GiB, in_use_bytes=15 * GiB, activation_bytes=GiB).to_dict()
    rows = gpu_validate.comparison_rows(size, [gpu_validate._row("pool allocated", "GiB", 2.0, 1.0)])
    kv = next(r for r in rows if r["term"] == "KV cache")
    assert kv["measured"] == pytest.approx(size["kv_budget_bytes"] / GiB)
    assert kv["diff_pct"] == pytest.approx(100 * (kv["planned"] - kv["measured"]) / kv["measured"])
    assert rows[-1]["diff_pct"] == pytest.approx(-50.0)
    text = gpu_validate.format_table(rows)
    assert text.splitlines()[0].startswith("term") and "-50.00%" in text and "KV cache" in text


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measures_the_activation_peak_and_non_torch_memory():
    dev = torch.device("cuda", torch.cuda.current_device())
    keep = torch.empty(256 * MiB, dtype=torch.uint8, device=dev)  # stands for the weights

    def profile():
        x = torch.empty(512 * MiB, dtype=torch.uint8, device=dev)
        y = torch.empty(128 * MiB, dtype=torch.uint8, device=dev)
        return x.numel() + y.numel()

    size = size_kv_pool("llama-3.1-8b", device=dev, profile_fn=profile)
    free, total = torch.cuda.mem_get_info(dev)
    assert size.measured and size.device == "cuda" and size.total_bytes == total
    assert size.activation_peak_bytes == 640 * MiB  # both temporaries live at once, nothing more
    assert size.torch_in_use_bytes >= 256 * MiB
    assert 0 < size.non_torch_bytes < 4 * GiB  # the CUDA context at least
    assert size.kv_budget_bytes == (size.budget_bytes - size.torch_in_use_bytes - size.non_torch_bytes
                                    - size.activation_peak_bytes - size.headroom_bytes)
    assert size.num_blocks == size.kv_budget_bytes // size.bytes_per_block
    pool = torch.empty(size.kv_bytes, dtype=torch.uint8, device=dev)  # the pool really fits
    assert pool.numel() == size.kv_bytes
    del pool, keep
