"""NCCL buffer memory, the all-reduce model, scaling and interconnect comparison."""
import pytest

from kvpool.errors import InvalidArgumentError, PlanError
from kvpool.plan import NCCLSettings, allreduce_seconds, compare_interconnects, get_interconnect, scale
from kvpool.plan.comm import LL128_DEFAULT, LL_DEFAULT, SIMPLE_DEFAULT, nccl_buffer_bytes, parse_protocols
from kvpool.plan.comm_report import comm_report


def test_nccl_defaults_are_nccls():
    assert SIMPLE_DEFAULT == 4 * 1024 * 1024
    assert LL_DEFAULT == 512 * 1024
    assert LL128_DEFAULT == 4_915_200


def test_buffer_bytes_per_connection_channels_nvls():
    """One communicator of 4 H100s, by hand from NCCL 2.27.5's constants (see kvpool.plan.nccl_buffers)."""
    nv, mib = get_interconnect("nvlink4"), 1 << 20
    got = nccl_buffer_bytes(4, nv, NCCLSettings())
    # p2p.cc: receiver 4,096 + LL + LL128 + Simple -> 2 MiB multiple = 10 MiB; sender 4,096 -> 2 MiB; 24 channels
    assert got["protocol_buffers"] == 24 * (10 + 2) * mib
    # 32 P2P channels x 3 arrays + 2 devComm arrays + 24 NVLS peer arrays + credits, 2 MiB granules each
    assert got["setup"] == (32 * 3 + 2 + 24 + 1) * 2 * mib
    assert got["nvls"] == 16 * 2 * 128 * 1024 * 8 * 4  # nvls.cc: channels x 2 x chunk x steps x heads
    small = nccl_buffer_bytes(4, nv, NCCLSettings(buffsize=1 << 20, protocols=("Simple",), channels=4, nvls=False))
    # NCCL_PROTO does not shrink the buffers; 4,096 + LL + LL128 + 1 MiB = 6.2 MiB -> 8 MiB received, 2 MiB sent
    assert small == {"channels": 4, "setup": (4 * 3 + 2) * 2 * mib, "protocol_buffers": 4 * (8 + 2) * mib,
                     "nvls": 0, "total": (28 + 40) * mib}
    assert nccl_buffer_bytes(1, nv, NCCLSettings())["total"] == 0
    assert nccl_buffer_bytes(2, nv, NCCLSettings())["nvls"] == 0  # nvls.cc: no NVLS for 2 GPUs
    assert nccl_buffer_bytes(4, get_interconnect("pcie4"), NCCLSettings())["channels"] == 2
    # Ampere over NVLink reads: Simple moves to the sender (6 MiB each side, 12 MiB per channel either way)
    assert nccl_buffer_bytes(2, nv, NCCLSettings(), p2p_read=True)["protocol_buffers"] == 24 * 12 * mib
    # without cuMem the small arrays are cudaMalloc'd as asked (no 2 MiB granule)
    assert nccl_buffer_bytes(2, nv, NCCLSettings(cumem=False))["setup"] == (32 * 3 + 2) * 4096


def test_settings_from_env():
    env = {"NCCL_BUFFSIZE": "2097152", "NCCL_PROTO": "^LL128", "NCCL_MAX_NCHANNELS": "8", "NCCL_NVLS_ENABLE": "0"}
    s = NCCLSettings.from_env(env)
    assert (s.buffsize, s.protocols, s.channels, s.nvls) == (2 << 20, ("LL", "Simple"), 8, False)
    assert NCCLSettings.from_env(env, channels=2).channels == 2
    with pytest.raises(InvalidArgumentError, match="NCCL_BUFFSIZE"):
        NCCLSettings.from_env({"NCCL_BUFFSIZE": "lots"})
    with pytest.raises(InvalidArgumentError, match="unknown protocol"):
        parse_protocols("LL,Fast")


def test_allreduce_time_model():
    link = get_interconnect("nvlink4")
    n = 64 << 20
    expected = (6.6 + 6 * 0.6) * 1e-6 + 2 * 3 / 4 * n / 450e9
    assert allreduce_seconds(n, 4, link) == pytest.approx(expected)
    assert allreduce_seconds(n, 1, link) == 0.0
    assert allreduce_seconds(n, 8, get_interconnect("pcie4")) > allreduce_seconds(n, 8, link)


def test_scale_rows_and_summary():
    res = scale("llama-3.1-70b", "h100-sxm", (1, 2, 4, 8), seq_len=8192)
    rows = {r["tp"]: r for r in res["rows"]}
    assert not rows[1]["fits"] and "over by" in rows[1]["reason"]
    assert rows[2]["fits"] and rows[8]["kv_tokens"] > rows[4]["kv_tokens"] > rows[2]["kv_tokens"]
    lat = [rows[t]["token_latency_ms"] for t in (2, 4, 8)]
    assert lat[0] > lat[1] > lat[2]  # HBM-bound: the weights split
    assert rows[8]["comm_share"] > rows[2]["comm_share"]
    assert rows[2]["speedup"] == 1.0
    assert any("single-token latency" in line for line in res["summary"])


def test_scale_small_model_latency_stops_paying():
    res = scale("llama-3.1-8b", "a100-80gb", (1, 2, 4, 8), seq_len=1024, interconnect="pcie4")
    assert any("stops paying" in line for line in res["summary"])


def test_interconnect_comparison():
    res = compare_interconnects("llama-3.1-70b", "h100-sxm", 4, ("nvlink4", "pcie4"), seq_len=4096, batch=32)
    nv, pcie = res["rows"]
    assert pcie["comm_share"] > nv["comm_share"] and pcie["decode_tokens_per_s"] < nv["decode_tokens_per_s"]
    assert nv["ratio_vs_first"] == 1.0 and pcie["ratio_vs_first"] < 1.0


def test_comm_report():
    rep = comm_report("llama-3.1-70b", "h100-sxm", 4, batch=16, seq_len=2048)
    assert rep["allreduces_per_forward"] == 161
    assert rep["bytes_per_allreduce_decode"] == 16 * 8192 * 2
    assert rep["rows"][0]["interconnect"] == "nvlink4"
    with pytest.raises(PlanError, match="single GPU"):
        comm_report("llama-3.1-8b", "h100-sxm", 1)
