"""Which device memory outside torch vLLM 0.19 allocates, and whether before or after its start-up snapshot.

vLLM sizes the KV cache as ``ceil(total x util) - weights - torch peak increase - non-torch increase``
(``v1/worker/gpu_worker.py`` ``determine_available_memory``, ``utils/mem_utils.py`` ``memory_profiling``), where
the non-torch increase is measured from ``init_snapshot``, taken in ``init_device`` AFTER the CUDA context and
``init_worker_distributed_environment``. So only what appears after that snapshot is subtracted; what exists
before it sits in the ``1 - util`` headroom. For tp = N, pp = 1 on one node (``distributed/parallel_state.py``
``initialize_model_parallel``; groups of one rank get no device communicator):

Before the snapshot (shown, not subtracted):
  * the CUDA context;
  * the TP group's ``CudaCommunicator`` (``device_communicators/cuda_communicator.py``): a pynccl communicator
    (``pynccl.py``: ``ncclCommInitRank`` + a 4-byte warm-up all-reduce, which NCCL sends over Ring/LL, the lowest
    latency in ``graph/tuning.cc``, so the ring is connected), the custom all-reduce's IPC buffers
    (``custom_all_reduce.py``: ``meta_size() + max_size`` and ``max_size`` by cudaMalloc, an 8 MiB ``rank_data``
    tensor) and torch's symmetric-memory buffer (``symm_mem.py``, ``VLLM_ALLREDUCE_USE_SYMM_MEM=1``);
  * the same pynccl communicator for the EP group of a MoE model and the PP group when pp > 1.

After the snapshot (the comm term, subtracted):
  * torch's own ProcessGroupNCCL communicator for the TP ``device_group``, created lazily by its first collective:
    the sampler warm-up's logits all-gather (``layers/logits_processor.py`` -> ``base_device_communicator.py``
    ``all_gather`` -> ``dist.all_gather_into_tensor``) or FlashInfer's workspace hand-shake; its set-up and ring;
  * NVLS buffers when the profile run's all-reduce (``max_num_batched_tokens x hidden`` elements) is too large for
    the custom all-reduce and symmetric memory and goes to pynccl on a multicast board with more than 2 ranks;
  * FlashInfer's all-reduce + RMSNorm fusion workspace (``compilation/passes/fusion/allreduce_rms_fusion.py``,
    on by default at -O2 for tp > 1 on compute capability 9.0 / 10.x, ``config/vllm.py``
    ``enable_allreduce_rms_fusion``; built when torch.compile first runs, in the profile run; not with
    ``--enforce-eager``): three ``SymmDeviceMemory`` buffers (FlashInfer 0.6.6 ``comm/trtllm_ar.py``), each
    rounded up to the multicast granularity (``comm/mnnvl.py``).
Plus the overhead term: kernels and library handles loaded lazily by the profile run (`LAZY_KERNELS_MIB`).

The CUDA-graph profiling (``profile_cudagraph_memory``, inside the profiled window unless ``--enforce-eager``)
captures into a temporary pool and frees it (``CUDAGraphWrapper.clear_all_graphs``); its estimate is subtracted
only with ``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1`` (default 0), and the real graphs are captured after the
KV cache is allocated, out of the headroom. Captured all-reduces use the custom all-reduce or symmetric memory
(decode batches up to 512 tokens), so graphs connect nothing in NCCL.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .comm import default_channels, nccl_buffer_bytes
from .dtypes import DTYPES
from .hardware import LAZY_KERNELS_MIB, MULTICAST_GRANULARITY_MIB
from .nccl_buffers import round_up
from .units import MIB

# device_communicators/all_reduce_utils.py (vLLM 0.19): largest input per world size, by compute capability
CUSTOM_ALL_REDUCE_MAX_SIZES = {"9.0": {2: 64 * MIB, 4: 32 * MIB, 6: MIB // 2, 8: MIB // 4},
                               "10.0": {2: 2 * MIB, 4: 2 * MIB, 6: MIB, 8: MIB}}
SYMM_MEM_ALL_REDUCE_MAX_SIZES = {"9.0": {2: 64 * MIB, 4: 32 * MIB, 6: 64 * MIB, 8: 64 * MIB},
                                 "10.0": {2: 8 * MIB, 4: 32 * MIB, 6: 128 * MIB, 8: 128 * MIB}}
CUSTOM_ALL_REDUCE_DEFAULT_MAX = 8 * MIB  # CustomAllreduce(max_size=8192 * 1024); the table only lowers it
CUSTOM_ALL_REDUCE_RANK_DATA = 8 * MIB  # custom_all_reduce.py: rank_data = torch.empty(8 MiB)
CUSTOM_ALL_REDUCE_SIZES = (2, 4, 6, 8)  # CustomAllreduce._SUPPORTED_WORLD_SIZES
CUDA_MALLOC_PAGE = 2 * MIB  # cudaMalloc of a few MiB comes in 2 MiB pages
SYMM_MEM_SIGNAL_PAD = 2 * MIB  # torch's symmetric-memory signal pad, one granule (estimate)
# compilation/passes/fusion/allreduce_rms_fusion.py FI_ALLREDUCE_FUSION_MAX_SIZE_MB, by compute capability
FI_FUSION_MAX_SIZE = {"9.0": {2: 64 * MIB, 4: 2 * MIB, 8: MIB // 2}, "10.0": {2: 64 * MIB, 4: 32 * MIB, 8: MIB}}
FI_BARRIER_FLAGS = 256  # flashinfer comm/trtllm_ar.py BarrierFlagCount
FI_SIGNAL_PAD = 2048  # flashinfer comm/mnnvl.py SIGNAL_PAD_SIZE
FI_MAX_COMM_SIZE = 2147483647 & ~((1 << 21) - 1)  # flashinfer comm/trtllm_ar.py MAX_COMM_SIZE
FI_LAMPORT_BUFFERS = 3  # lamport_buffer_size = lamport_comm_size * 3


@dataclass(frozen=True)
class Communicator:
    """One NCCL communicator vLLM creates, and its bytes on one GPU."""

    name: str
    ranks: int
    before_snapshot: bool  # created in init_device (True) or by the profile run (False)
    setup: int  # ncclCommInitRank's arrays
    ring: int  # the ring's connections (connected by its first collective)
    nvls: int = 0  # NVLS buffers, when a collective of this communicator uses NVLS

    @property
    def total(self) -> int:
        return self.setup + self.ring + self.nvls


@dataclass(frozen=True)
class NonTorch:
    """vLLM's device memory outside torch on one GPU, split at its start-up snapshot; bytes."""

    before: dict  # cuda_context, nccl_communicators, custom_allreduce, symm_mem
    after_comm: dict  # torch_nccl_comm, nvls_buffers, flashinfer_workspace
    after_kernels: int  # lazily loaded kernels and library handles
    communicators: tuple[Communicator, ...] = field(default=())
    allreduce_path: str = "none"  # where the profile run's all-reduce goes

    @property
    def before_bytes(self) -> int:
        return sum(self.before.values())

    @property
    def after_comm_bytes(self) -> int:
        return sum(self.after_comm.values())


def fi_fusion_workspace_bytes(req) -> int:
    """FlashInfer's all-reduce fusion workspace on one GPU (0 where vLLM 0.19 does not build it).

    ``trtllm_create_ipc_workspace_for_all_reduce_fusion``: buffer ``tp x T x hidden x 2``, flags
    ``tp x 256 x 4``, Lamport ``3 x tp x T x hidden x 2`` with ``T = min(max_size // (hidden x dtype), max
    batched tokens)``; each rounded to 2 MiB, plus a 2,048 B signal pad, then to the multicast granularity.

    >>> # llama-3.1-70b at tp 2 on H100: 128 MiB, 2 KiB and 384 MiB become 3 x 512 MiB
    """
    gpu, tp = req.gpu, req.tp
    sizes = FI_FUSION_MAX_SIZE.get(_cc_family(gpu), {})
    if tp not in sizes or req.pp > 1 or not req.cuda_graphs or not gpu.multicast:
        return 0
    hidden, elem = req.spec.hidden_size, DTYPES[req.serving_dtype].bytes
    tokens = min(sizes[tp] // (hidden * elem), req.max_batched_tokens)
    lamport_elem = 4 if req.serving_dtype == "fp32" else 2
    buffers = (tp * tokens * hidden * 2, tp * FI_BARRIER_FLAGS * 4,
               FI_LAMPORT_BUFFERS * min(tp * tokens * hidden * lamport_elem, FI_MAX_COMM_SIZE))
    granule = MULTICAST_GRANULARITY_MIB * MIB
    return sum(round_up(round_up(round_up(b, 2 * MIB) + FI_SIGNAL_PAD, 2 * MIB), granule) for b in buffers)


def _cc_family(gpu) -> str:
    """"9.0" or "10.0" (vLLM's tables key Blackwell 10.x together), else the GPU's own."""
    cc = gpu.compute_capability
    return "10.0" if cc.startswith("10.") else cc


def custom_allreduce(req) -> tuple[int, int]:
    """(max input bytes, device bytes) of vLLM's custom all-reduce on one GPU; (0, 0) where it is off."""
    tp, gpu, link = req.tp, req.gpu, req.link
    if tp not in CUSTOM_ALL_REDUCE_SIZES or (tp > 2 and not link.name.startswith("NVLink")):
        return 0, 0
    limit = CUSTOM_ALL_REDUCE_DEFAULT_MAX
    if symm_mem_max(req):  # vLLM lowers the limit only when symmetric memory is on
        limit = min(limit, CUSTOM_ALL_REDUCE_MAX_SIZES.get(_cc_family(gpu), {}).get(tp, limit))
    meta = round_up(limit + 4096, CUDA_MALLOC_PAGE)  # ops.meta_size() is a few KiB of flags
    return limit, meta + round_up(limit, CUDA_MALLOC_PAGE) + CUSTOM_ALL_REDUCE_RANK_DATA


def symm_mem_max(req) -> int:
    """torch symmetric-memory all-reduce's limit (0: off; needs multicast and a listed world size)."""
    if not req.gpu.multicast:
        return 0
    return SYMM_MEM_ALL_REDUCE_MAX_SIZES.get(_cc_family(req.gpu), {}).get(req.tp, 0)


def allreduce_path(req, message: int, nvls_on: bool) -> str:
    """Where ``CudaCommunicator.all_reduce`` sends a ``message``-byte all-reduce (its order of tries)."""
    if req.tp <= 1:
        return "none"
    ca_limit, _ = custom_allreduce(req)
    if message < ca_limit:
        return "custom all-reduce"
    if req.serving_dtype == "bf16" and message < symm_mem_max(req):
        return "symmetric memory"
    return "NCCL NVLS" if nvls_on else "NCCL ring"


def _communicator(name: str, ranks: int, link, req, before: bool, connect_nvls: bool) -> Communicator:
    """A pynccl / torch communicator of ``ranks`` GPUs: set-up, ring, and NVLS buffers when connected."""
    nccl = req.nccl
    parts = nccl_buffer_bytes(ranks, link, nccl, p2p_read=req.gpu.compute_capability == "8.0"
                              and link.name.startswith("NVLink"), multicast=req.gpu.multicast)
    ring = parts["protocol_buffers"]
    if not nccl.lazy_connect and ranks > 2:  # init connects the tree too: one more pair per channel (estimate)
        ring *= 2
    nvls = parts["nvls"] if (connect_nvls or not nccl.lazy_connect) else 0
    return Communicator(name, ranks, before, parts["setup"], ring, nvls)


def nontorch(req) -> NonTorch:
    """vLLM 0.19's non-torch device memory on one GPU of ``req``, before and after its start-up snapshot."""
    tp = req.tp
    lazy = LAZY_KERNELS_MIB * MIB
    context = max(0, req.cuda_context_bytes - lazy)
    message = req.max_batched_tokens * req.spec.hidden_size * DTYPES[req.serving_dtype].bytes
    probe = nccl_buffer_bytes(tp, req.link, req.nccl, multicast=req.gpu.multicast)
    path = allreduce_path(req, message, probe["nvls"] > 0)
    comms = []
    if tp > 1:
        comms.append(_communicator("TP pynccl", tp, req.link, req, True, False))
        if req.spec.is_moe:
            comms.append(_communicator("EP pynccl", tp, req.link, req, True, False))
    if req.pp > 1:
        comms.append(_communicator("PP pynccl", req.pp, req.pipeline_link(), req, True, False))
    after_nvls = 0
    if path == "NCCL NVLS" and req.nccl.lazy_connect:  # pynccl's first NVLS all-reduce, in the profile run
        after_nvls = probe["nvls"]
    if tp > 1:
        comms.append(_communicator("torch ProcessGroupNCCL (TP)", tp, req.link, req, False, False))
    _, ca_bytes = custom_allreduce(req) if tp > 1 else (0, 0)
    symm = symm_mem_max(req) if tp > 1 else 0
    before = {"cuda_context": context,
              "nccl_communicators": sum(c.total for c in comms if c.before_snapshot),
              "custom_allreduce": ca_bytes,
              "symm_mem": symm + SYMM_MEM_SIGNAL_PAD if symm else 0}
    after = {"torch_nccl_comm": sum(c.total for c in comms if not c.before_snapshot),
             "nvls_buffers": after_nvls,
             "flashinfer_workspace": fi_fusion_workspace_bytes(req) if tp > 1 else 0}
    return NonTorch(before, after, lazy, tuple(comms), path)


def coll_channels(req) -> int:
    """The collective channel count the plan assumes for the TP communicators."""
    return req.nccl.channels or default_channels(req.link)


__all__ = ["NonTorch", "Communicator", "nontorch", "fi_fusion_workspace_bytes", "custom_allreduce", "symm_mem_max",
           "allreduce_path", "coll_channels"]
