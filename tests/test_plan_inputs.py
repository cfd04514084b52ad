"""The planner functions refuse bad values themselves (not only the command line): issue 9, items 13-14."""
import json
import math

import pytest

from kvpool.errors import InvalidArgumentError, PlanError
from kvpool.plan import NCCLSettings, compare_interconnects, make_request, plan_memory, scale
from kvpool.plan.comm_report import comm_report
from kvpool.plan.diagnose import parse_snapshots

GIB = 1 << 30


@pytest.mark.parametrize("field,value", [
    ("buffsize", -1), ("buffsize", 0), ("ll_buffsize", -1), ("ll128_buffsize", 0), ("channels", -1), ("channels", 0),
    ("nvls_channels", 0), ("nvls_chunksize", -4), ("peers", 0), ("staging_layers", 0), ("staging_layers", -2),
    ("buffsize", 1.5), ("channels", True), ("nvls", "yes"), ("protocols", ()), ("protocols", ("LL", "Fast")),
])
def test_nccl_settings_refuse_bad_values(field, value):
    with pytest.raises(InvalidArgumentError, match=field.split("_")[0] if field != "protocols" else "protocol"):
        NCCLSettings(**{field: value})


def test_negative_channels_cannot_buy_kv_blocks():
    base = plan_memory("llama-3.1-70b", 4, gpu="h100-sxm")
    with pytest.raises(InvalidArgumentError, match="NCCL_MAX_NCHANNELS"):
        plan_memory("llama-3.1-70b", 4, gpu="h100-sxm", nccl=NCCLSettings(channels=-1))
    assert base.per_gpu["comm_gib"] > 0


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"seq_len": 0}, InvalidArgumentError, "seq_len must be a positive integer, got 0"),
    ({"seq_len": -1}, InvalidArgumentError, "seq_len must be a positive integer"),
    ({"batch": 0}, InvalidArgumentError, "batch must be a positive integer, got 0"),
    ({"tps": ()}, InvalidArgumentError, "tps"),
    ({"tps": (0, 2)}, InvalidArgumentError, "tp must be a positive integer, got 0"),
    ({"tps": (2.0,)}, InvalidArgumentError, "tp must be a positive integer"),
    ({"pp": 0}, InvalidArgumentError, "pp must be a positive integer"),
    ({"pp": 1000}, PlanError, "pp=1000 is larger than"),
    ({"block_size": 12}, InvalidArgumentError, "power of two"),
    ({"mem_fraction": math.nan}, InvalidArgumentError, "mem_fraction"),
])
def test_scale_refuses_bad_values(kwargs, error, needle):
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        scale("llama-3.1-70b", "a100-80gb", **kwargs)


def test_scale_keeps_tp_that_does_not_divide_as_a_row():
    rows = scale("llama-3.1-70b", "h100-sxm", (3, 4))["rows"]
    assert [r["tp"] for r in rows] == [3, 4] and not rows[0]["fits"] and "does not divide" in rows[0]["reason"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"tp": 0}, "tp must be a positive integer, got 0"),
    ({"tp": -4}, "tp must be a positive integer, got -4"),
    ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
    ({"batch": 0}, "batch must be a positive integer, got 0"),
    ({"batch": -3}, "batch must be a positive integer, got -3"),
    ({"links": ()}, "links"),
])
def test_comm_report_refuses_bad_values(kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        comm_report("llama-3.1-70b", "h100-sxm", **{"tp": 4, **kwargs})


@pytest.mark.parametrize("kwargs,needle", [
    ({"tp": 0}, "tp must be a positive integer"),
    ({"seq_len": 0}, "seq_len must be a positive integer"),
    ({"batch": -1}, "batch must be a positive integer"),
    ({"links": ()}, "links"),
])
def test_compare_interconnects_refuses_bad_values(kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        compare_interconnects("llama-3.1-70b", "h100-sxm", **{"tp": 4, **kwargs})


@pytest.mark.parametrize("entry,needle", [
    ({"total": 80 * GIB, "free": 85 * GIB}, "free"),
    ({"total": 0, "free": 0}, "total"),
    ({"total": 80 * GIB, "used": 81 * GIB}, "above total"),
    ({"total": math.inf, "free": GIB}, "'total'"),
    ({"total": 80 * GIB, "free": GIB, "peak": math.nan}, "'peak'"),
    ({"total": 80 * GIB, "free": GIB, "rank": -1}, "rank"),
    ({"total": 80 * GIB, "free": GIB, "rank": 1.5}, "rank"),
])
def test_parse_snapshots_refuses_impossible_figures(entry, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        parse_snapshots(json.dumps([entry]))


def test_the_planner_takes_numpy_integers_as_plain_ints():
    # as size_kv_pool does (item 11): np.int64 tp/block_size were refused, np.int64 pp/batch leaked into to_dict()
    import numpy as np

    from kvpool.plan.kv import kv_shard_layout
    from kvpool.plan.model import load_model_spec
    from kvpool.plan.planner import TPKVCachePlanner

    plain = plan_memory("llama-3.1-8b", 2, 2, block_size=32, batch=4, seq_len=128, max_seqs=8)
    numpy = plan_memory("llama-3.1-8b", np.int64(2), np.int64(2), block_size=np.int64(32), batch=np.int32(4),
                        seq_len=np.int64(128), max_seqs=np.int64(8))
    assert json.dumps(numpy.to_dict()) == json.dumps(plain.to_dict())
    assert TPKVCachePlanner("llama-3.1-8b", tp=np.int64(2), block_size=np.int64(16)).block_size == 16
    layout = kv_shard_layout(load_model_spec("llama-3.1-8b"), tp=np.int64(2))
    assert type(layout.kv_heads) is int and json.dumps(layout.to_dict())
    with pytest.raises(InvalidArgumentError, match=r"block_size must be a positive power of two .*got np.int64\(12\)"):
        plan_memory("llama-3.1-8b", block_size=np.int64(12))


def test_comm_figures_of_a_numpy_tp_are_json():
    import numpy as np

    for report in (comm_report("llama-3.1-70b", "h100-sxm", np.int64(4)),
                   compare_interconnects("llama-3.1-70b", "h100-sxm", np.int64(4))):
        assert json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("gpu, tokens, seqs", [("h100-sxm", 8192, 1024), ("h200", 8192, 1024),
                                               ("a100-80gb", 2048, 256), ("l40s", 2048, 256)])
def test_defaults_are_vllm_serves_for_the_card(gpu, tokens, seqs):
    request = make_request("llama-3.1-8b", 1, gpu=gpu)
    assert (request.max_batched_tokens, request.max_seqs) == (tokens, seqs)


def test_default_max_seqs_is_capped_by_max_batched_tokens_and_a_given_one_is_checked():
    assert make_request("llama-3.1-8b", 1, max_batched_tokens=512).max_seqs == 512
    with pytest.raises(InvalidArgumentError, match=r"max_seqs \(600\) must be at most max_batched_tokens \(512\)"):
        make_request("llama-3.1-8b", 1, max_batched_tokens=512, max_seqs=600)
