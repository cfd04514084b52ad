"""vLLM 0.19's non-torch memory as the planner splits it at vLLM's start-up snapshot (issue 12, item 2).

Every expected figure is worked out by hand from the constants the code cites (NCCL 2.27.5 source, vLLM 0.19
source, FlashInfer 0.6.6 source), not read back from the planner.
"""
import json
import math

import pytest

from kvpool.cli import main
from kvpool.plan import NCCLSettings, make_request, plan_memory
from kvpool.plan.nccl_buffers import NCCLBufferSizes, connection_bytes, p2p_channels, setup_bytes
from kvpool.plan.vllm_comm import allreduce_path, fi_fusion_workspace_bytes, nontorch

MIB, GIB = 1 << 20, 1 << 30
RING = 24 * (10 + 2) * MIB  # 24 channels x (10 MiB received + 2 MiB sent) per rank
SETUP = (32 * 3 + 2) * 2 * MIB  # 32 P2P channels x 3 arrays + 2 devComm arrays, one 2 MiB granule each
SETUP_NVLS = SETUP + (24 + 1) * 2 * MIB  # + an NVLS peer array per collective channel + the credit buffer
FI = 3 * 512 * MIB  # buffer, flags, Lamport: each rounded up to the 512 MiB multicast granularity


def test_one_p2p_connection_from_nccls_constants():
    # receiver: sizeof(ncclRecvMem) 4,096 + LL 524,288 + LL128 4,915,200 + Simple 4,194,304 = 9,637,888 B,
    # aligned to CUDA_IPC_MIN (2 MiB) -> 10 MiB; sender: sizeof(ncclSendMem) 4,096 B -> 2 MiB
    hopper = connection_bytes(NCCLBufferSizes())
    assert (hopper.recv, hopper.send) == (10 * MIB, 2 * MIB)
    # Ampere over NVLink reads: 4,096 + LL + LL128 = 5,443,584 -> 6 MiB; 4,096 + Simple -> 6 MiB
    ampere = connection_bytes(NCCLBufferSizes(p2p_read=True))
    assert (ampere.recv, ampere.send) == (6 * MIB, 6 * MIB)
    # NCCL_BUFFSIZE=16 MiB: 4,096 + LL + LL128 + 16 MiB = 21.7 MiB -> 22 MiB
    assert connection_bytes(NCCLBufferSizes(simple=16 * MIB)).recv == 22 * MIB
    assert p2p_channels(24) == 32 and p2p_channels(16) == 16
    assert setup_bytes(24, False, NCCLBufferSizes()) == SETUP


@pytest.mark.parametrize("model, tp, pp, expected", [
    ("llama-3.1-8b", 1, 1, []),
    ("llama-3.1-70b", 2, 1, [("TP pynccl", True), ("torch ProcessGroupNCCL (TP)", False)]),
    ("llama-3.1-70b", 4, 1, [("TP pynccl", True), ("torch ProcessGroupNCCL (TP)", False)]),
    ("llama-3.1-70b", 8, 1, [("TP pynccl", True), ("torch ProcessGroupNCCL (TP)", False)]),
    # a MoE model gets the EP group's communicator too (parallel_state.py: only when model_config.is_moe)
    ("mixtral-8x7b", 2, 1, [("TP pynccl", True), ("EP pynccl", True), ("torch ProcessGroupNCCL (TP)", False)]),
    ("llama-3.1-8b", 1, 2, [("PP pynccl", True)]),
])
def test_communicators_vllm_creates_and_when(model, tp, pp, expected):
    nt = nontorch(make_request(model, tp, pp))
    assert [(c.name, c.before_snapshot) for c in nt.communicators] == expected


def test_non_torch_after_the_snapshot_tp1_vs_tp2_4_8():
    """llama-3.1-70b on H100 SXM with vLLM serve's defaults (8,192 batched tokens, bf16)."""
    def after(model, tp):
        nt = nontorch(make_request(model, tp))
        return nt.after_comm, nt.after_comm_bytes + nt.after_kernels

    comm1, total1 = after("llama-3.1-8b", 1)
    assert sum(comm1.values()) == 0 and total1 == 256 * MIB  # lazily loaded kernels only (vLLM's tp-1 reading)
    comm2, total2 = after("llama-3.1-70b", 2)
    # NVLS needs > 2 GPUs (nvls.cc); the 128 MiB profile all-reduce goes over the ring pynccl connected at init
    assert comm2 == {"torch_nccl_comm": SETUP + RING, "nvls_buffers": 0, "flashinfer_workspace": FI}
    comm4, total4 = after("llama-3.1-70b", 4)
    assert comm4 == {"torch_nccl_comm": SETUP_NVLS + RING, "nvls_buffers": 16 * 2 * 1 * MIB * 4,
                     "flashinfer_workspace": FI}
    comm8, _ = after("llama-3.1-70b", 8)
    assert comm8["nvls_buffers"] == 16 * 2 * MIB * 8
    # vLLM's start-up logs (issue 12): ~0.25 GiB at tp 1, ~2.1-2.2 GiB at tp 2 and 4
    assert total1 / GIB == pytest.approx(0.25)
    assert 2.0 < total2 / GIB < 2.3 and 2.0 < total4 / GIB < 2.45


def test_flashinfer_fusion_workspace_where_vllm_builds_it():
    # tp 2, hidden 8192: T = min(64 MiB // (8192 x 2), 8192) = 4096; buffer 2 x 4096 x 8192 x 2 = 128 MiB,
    # flags 2 x 256 x 4 = 2 KiB, Lamport 3 x 128 MiB = 384 MiB: each up to 512 MiB
    assert fi_fusion_workspace_bytes(make_request("llama-3.1-70b", 2)) == FI
    assert fi_fusion_workspace_bytes(make_request("llama-3.1-70b", 2, cuda_graphs=False)) == 0  # enforce-eager
    assert fi_fusion_workspace_bytes(make_request("llama-3.1-70b", 4, gpu="a100-80gb")) == 0  # compute cap 8.0
    assert fi_fusion_workspace_bytes(make_request("llama-3.1-70b", 2, gpu="h100-nvl")) == 0  # no multicast
    assert fi_fusion_workspace_bytes(make_request("llama-3.1-405b", 8, 2)) == 0  # tp-pp: vLLM turns it off


def test_where_the_profile_all_reduce_goes():
    path = lambda model, tp, tokens: nontorch(make_request(model, tp, max_batched_tokens=tokens)).allreduce_path  # noqa: E731
    assert path("llama-3.1-70b", 2, 8192) == "NCCL ring"  # 128 MiB: above symmetric memory's 64 MiB
    assert path("llama-3.1-70b", 2, 2048) == "symmetric memory"  # 32 MiB < 64 MiB
    assert path("llama-3.1-70b", 4, 8192) == "NCCL NVLS"
    assert path("llama-3.1-8b", 8, 256) == "symmetric memory"  # 2 MiB: above tp 8's 256 KiB custom all-reduce
    req = make_request("llama-3.1-8b", 2, max_batched_tokens=256, max_seqs=256)
    assert allreduce_path(req, 2 * MIB, False) == "custom all-reduce"  # below 8 MiB


@pytest.mark.parametrize("tp, gpu", [(1, "h100-sxm"), (2, "h100-sxm"), (4, "h100-sxm"), (8, "a100-80gb")])
def test_kv_is_vllms_formula_and_the_context_is_not_subtracted(tp, gpu):
    model = "llama-3.1-8b" if tp == 1 else "llama-3.1-70b"
    plan = plan_memory(model, tp=tp, gpu=gpu)
    t = {x.name: x.bytes for x in plan.tight.terms}
    # v1/worker/gpu_worker.py: requested_memory - weights - torch peak increase - non-torch increase
    requested = math.ceil(plan.total_bytes * 0.9)
    assert plan.tight.kv_bytes == requested - t["weights"] - t["activation"] - (t["comm"] + t["overhead"])
    bigger_context = plan_memory(model, tp=tp, gpu=gpu, cuda_context_mib=2000)
    assert bigger_context.tight.kv_bytes == plan.tight.kv_bytes
    assert bigger_context.before_snapshot.bytes - plan.before_snapshot.bytes == (2000 - plan.request.gpu.cuda_context_mib) * MIB


def test_before_the_snapshot_row_json_and_warning(capsys, monkeypatch):
    plan = plan_memory("llama-3.1-70b", tp=2)
    parts = plan.before_snapshot.parts
    assert parts["nccl_communicators"] == SETUP + RING  # the TP pynccl comm, ring connected by its warm-up
    assert parts["custom_allreduce"] == (10 + 8 + 8) * MIB  # meta + 8 MiB buffer (cudaMalloc), 8 MiB rank_data
    assert parts["cuda_context"] == (695 - 256) * MIB
    assert plan.per_gpu["before_snapshot_gib"] == round(plan.before_snapshot.bytes / GIB, 4)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "llama-3.1-70b", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "before vLLM's snapshot" in out and "inside the headroom" in out
    tight = plan_memory("llama-3.1-8b", tp=4, mem_fraction=0.995)  # 0.4 GiB of headroom, 1 GiB before
    assert any("refuses to start" in w for w in tight.warnings)
    assert not any("refuses to start" in w for w in plan.warnings)


def test_overrides_still_win():
    base = plan_memory("llama-3.1-70b", tp=4)
    given = plan_memory("llama-3.1-70b", tp=4, comm_gib=3, overhead_gib=1, mem_fraction=0.9)
    assert given.term("comm").bytes == 3 * GIB and given.term("overhead").bytes == GIB
    assert given.term("comm").computed == base.term("comm").bytes
    eager = plan_memory("llama-3.1-70b", tp=4, cuda_graphs=False)  # --enforce-eager: no torch.compile, no FI
    assert base.term("comm").bytes - eager.term("comm").bytes == FI
    no_nvls = plan_memory("llama-3.1-70b", tp=4, nccl=NCCLSettings(nvls=False))
    assert base.term("comm").bytes - no_nvls.term("comm").bytes == 128 * MIB + 25 * 2 * MIB
    eager_connect = nontorch(make_request("llama-3.1-70b", 4, nccl=NCCLSettings.from_env({"NCCL_CUMEM_ENABLE": "0"})))
    torch_comm = next(c for c in eager_connect.communicators if not c.before_snapshot)
    # no cuMem: no runtime connect, so init connects ring + tree (+ NVLS) and the small arrays are not 2 MiB each
    assert torch_comm.ring == 2 * RING and torch_comm.nvls == 16 * 2 * MIB * 4 and torch_comm.setup < MIB


def test_nccl_buffsize_from_the_environment_moves_the_ring(capsys, monkeypatch):
    monkeypatch.setenv("NCCL_BUFFSIZE", str(16 * MIB))
    assert main(["plan", "llama-3.1-70b", "--tp", "4", "--json"]) == 0
    nccl = json.loads(capsys.readouterr().out)["details"]["comm_bytes"]["nccl_tp"]
    assert nccl["protocol_buffers"] == 24 * (22 + 2) * MIB  # 16 MiB Simple: 22 MiB received + 2 MiB sent
