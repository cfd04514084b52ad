"""GPU and interconnect presets, each figure with its source.

GPU memory is what the driver reports (``nvidia-smi --query-gpu=memory.total``, MiB) as public
nvidia-smi outputs of each card show it; it is a little above what ``torch.cuda.mem_get_info`` reports
as total on some cards. Bandwidth and compute figures are the vendor datasheet's peak numbers; compute is
the *dense* (no 2:4 sparsity) bf16/fp16 tensor rate with fp32 accumulate.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from ..errors import InvalidArgumentError
from .units import GIB, MIB  # noqa: F401 (GIB: re-exported, `from kvpool.plan.hardware import GIB`)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_mib: int  # nvidia-smi memory.total
    hbm_gbps: float  # memory bandwidth, GB/s (1e9 bytes/s)
    bf16_tflops: float  # dense bf16 tensor rate, 1e12 flop/s
    fp8_tflops: float  # dense fp8 tensor rate (0: no fp8 tensor cores)
    interconnect: str  # default GPU-GPU link inside one server
    cuda_context_mib: int  # CUDA context + kernels loaded lazily by torch (see `CUDA_CONTEXT_NOTE`)
    cuda_total_mib: int | None = None  # total as cudaMemGetInfo / torch report it, where measured
    compute_capability: str = ""  # "9.0": picks vLLM's all-reduce limits and NCCL's P2P read mode
    nvswitch: bool = False  # an HGX/DGX NVSwitch board (SXM); with compute capability >= 9.0: NVLS multicast

    @property
    def memory_bytes(self) -> int:
        """What a CUDA process can use: cudaMemGetInfo's total where measured, else nvidia-smi's."""
        return (self.cuda_total_mib or self.memory_mib) * MIB

    @property
    def multicast(self) -> bool:
        """NVLink SHARP multicast (CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED): an NVSwitch board of Hopper or later."""
        return self.nvswitch and float(self.compute_capability or 0) >= 9.0

    def to_dict(self) -> dict:
        return asdict(self)


# CUDA context = memory outside torch's allocator after a forward pass at tp 1 (context, lazily loaded kernels,
# library handles). Hopper figure MEASURED here: 695 MiB on an H100 80GB HBM3 (torch 2.11.0+cu130,
# driver 580.159.04, after a Llama-3.1-8B forward; benchmarks/validate_plan_gpu.py). Other cards: 512 MiB
# (data-center Ampere) / 384 MiB (smaller cards) are estimates, not readings; override with
# --cuda-context-mib when you have measured your own stack.
CUDA_CONTEXT_NOTE = "CUDA context: 695 MiB measured on H100; estimates elsewhere; override with --cuda-context-mib"

# Kernels and library handles loaded lazily (CUDA_MODULE_LOADING=LAZY, the default since CUDA 12.2) AFTER vLLM's
# start-up snapshot: its profile run's kernels, cuBLAS/cuBLASLt handles, compiled Triton kernels, the sampler's.
# READING, not derived: vLLM 0.19's start-up logs at tp 1 on H100 show ~0.25 GiB of non-torch increase, and at
# tp 1 nothing else outside torch is allocated after the snapshot (issue 12). The rest of `cuda_context_mib` (the
# context itself) exists before the snapshot and sits in vLLM's headroom. Module sizes depend on the binaries
# (torch, vLLM, FlashAttention builds), so this stays an estimate elsewhere; --overhead-gib replaces it.
LAZY_KERNELS_MIB = 256

# cuMulticastGetGranularity(CU_MULTICAST_GRANULARITY_RECOMMENDED) on an H100 NVSwitch board: 512 MiB (a reading
# published with an H100 NVLS implementation; MINIMUM is 2 MiB). FlashInfer's SymmDeviceMemory rounds its physical
# allocation up to it (flashinfer/comm/mnnvl.py `_get_allocation_prop`), so each of the three buffers of its
# all-reduce fusion workspace takes 512 MiB. Blackwell: assumed the same (not read).
MULTICAST_GRANULARITY_MIB = 512

# Compute capability: NVIDIA's CUDA GPUs list (A100 8.0, A10/RTX 3090 8.6, L4/L40S/RTX 4090 8.9, H100/H200 9.0,
# B200 10.0). nvswitch: the SXM boards (HGX/DGX A100, H100, H200, B200); H100 PCIe and NVL (NVLink bridges in
# pairs) have no NVSwitch, hence no multicast.
GPUS = {
    # A100: NVIDIA A100 Tensor Core GPU datasheet (2021): 40GB HBM2 1,555 GB/s, 80GB HBM2e 2,039 GB/s,
    # BF16 312 TFLOPS dense, NVLink 3 600 GB/s. nvidia-smi: 40960 MiB / 81920 MiB.
    "a100-40gb": GPU("A100-SXM4-40GB", 40960, 1555, 312, 0, "nvlink3", 512, compute_capability="8.0", nvswitch=True),
    "a100-80gb": GPU("A100-SXM4-80GB", 81920, 2039, 312, 0, "nvlink3", 512, compute_capability="8.0", nvswitch=True),
    # H100: NVIDIA H100 Tensor Core GPU datasheet: SXM 80GB 3.35 TB/s, BF16 989 TFLOPS dense (1,979 sparse),
    # FP8 1,979 dense; PCIe 80GB 2.0 TB/s, BF16 756 dense, FP8 1,513; NVL 94GB 3.9 TB/s, BF16 835, FP8 1,671.
    # nvidia-smi: 81559 MiB (SXM and PCIe), 95830 MiB (NVL).
    # H100 SXM cudaMemGetInfo total MEASURED here: 81079 MiB (79.18 GiB; nvidia-smi shows 81559 MiB, the
    # driver keeps 480 MiB), torch 2.11.0+cu130, driver 580.159.04.
    "h100-sxm": GPU("H100-SXM5-80GB", 81559, 3350, 989, 1979, "nvlink4", 695, 81079, "9.0", nvswitch=True),
    "h100-pcie": GPU("H100-PCIe-80GB", 81559, 2000, 756, 1513, "pcie5", 695, compute_capability="9.0"),
    "h100-nvl": GPU("H100-NVL-94GB", 95830, 3900, 835, 1671, "nvlink4", 695, compute_capability="9.0"),
    # H200: NVIDIA H200 datasheet: 141GB HBM3e, 4.8 TB/s, BF16 989 dense, FP8 1,979 dense; nvidia-smi 143771 MiB.
    "h200": GPU("H200-SXM-141GB", 143771, 4800, 989, 1979, "nvlink4", 695, compute_capability="9.0", nvswitch=True),
    # B200: NVIDIA DGX B200 / HGX B200 datasheet: 180GB HBM3e per GPU, 8 TB/s, BF16 2.25 PFLOPS dense,
    # FP8 4.5 PFLOPS dense, NVLink 5 1.8 TB/s; nvidia-smi 183359 MiB.
    "b200": GPU("B200-180GB", 183359, 8000, 2250, 4500, "nvlink5", 695, compute_capability="10.0", nvswitch=True),
    # L4: NVIDIA L4 datasheet: 24GB GDDR6 300 GB/s, BF16 121 TFLOPS dense (242 sparse), FP8 242 dense; PCIe Gen4.
    "l4": GPU("L4-24GB", 23034, 300, 121, 242, "pcie4", 384, compute_capability="8.9"),
    # L40S: NVIDIA L40S datasheet: 48GB GDDR6 864 GB/s, BF16 362 TFLOPS dense (733 sparse), FP8 733 dense.
    "l40s": GPU("L40S-48GB", 46068, 864, 362, 733, "pcie4", 384, compute_capability="8.9"),
    # A10: NVIDIA A10 datasheet: 24GB GDDR6 600 GB/s, BF16 125 TFLOPS dense (250 sparse).
    "a10": GPU("A10-24GB", 23028, 600, 125, 0, "pcie4", 384, compute_capability="8.6"),
    # RTX 4090: NVIDIA Ada Lovelace architecture whitepaper: 24GB GDDR6X 1,008 GB/s, FP16/BF16 tensor with
    # FP32 accumulate 165.2 TFLOPS dense, FP8 330.3 dense (FP32 acc). No P2P between GeForce cards: PCIe via host.
    "rtx-4090": GPU("GeForce-RTX-4090", 24564, 1008, 165.2, 330.3, "pcie4", 384, compute_capability="8.9"),
    # RTX 3090: NVIDIA Ampere GA102 whitepaper: 24GB GDDR6X 936 GB/s, FP16/BF16 tensor with FP32 accumulate
    # 71 TFLOPS dense.
    "rtx-3090": GPU("GeForce-RTX-3090", 24576, 936, 71, 0, "pcie4", 384, compute_capability="8.6"),
}

# Streaming multiprocessors per card, by GPU name (vLLM's Triton top-k/top-p sampler keeps one float32
# vocabulary row per program, one program per SM at most). NVIDIA whitepapers: A100 (GA100) 108; H100 SXM5
# 132, PCIe 114, NVL 132; H200 132; B200 148 (Blackwell datasheet); L4 58, L40S 142, RTX 4090 128 (Ada
# whitepaper); A10 72, RTX 3090 82 (GA102 whitepaper).
SM_COUNTS = {"A100-SXM4-40GB": 108, "A100-SXM4-80GB": 108, "H100-SXM5-80GB": 132, "H100-PCIe-80GB": 114,
             "H100-NVL-94GB": 132, "H200-SXM-141GB": 132, "B200-180GB": 148, "L4-24GB": 58, "L40S-48GB": 142,
             "A10-24GB": 72, "GeForce-RTX-4090": 128, "GeForce-RTX-3090": 82}


def sm_count(gpu: GPU) -> int:
    """The card's streaming multiprocessors (132, an H100's, for a GPU not in `SM_COUNTS`)."""
    return SM_COUNTS.get(gpu.name, 132)


# CUDA compute capability (major, minor) by GPU name (NVIDIA's CUDA GPUs list): torch sizes its cuBLAS workspace
# by it (32 MiB on SM90, see `kvpool.plan.activation.cublas_workspace_bytes`).
CAPABILITIES = {"A100-SXM4-40GB": (8, 0), "A100-SXM4-80GB": (8, 0), "H100-SXM5-80GB": (9, 0), "H100-PCIe-80GB": (9, 0),
                "H100-NVL-94GB": (9, 0), "H200-SXM-141GB": (9, 0), "B200-180GB": (10, 0), "L4-24GB": (8, 9),
                "L40S-48GB": (8, 9), "A10-24GB": (8, 6), "GeForce-RTX-4090": (8, 9), "GeForce-RTX-3090": (8, 6)}


def capability(gpu: GPU) -> tuple[int, int]:
    """The card's compute capability ((9, 0), an H100's, for a GPU not in `CAPABILITIES`)."""
    return CAPABILITIES.get(gpu.name, (9, 0))


@dataclass(frozen=True)
class Interconnect:
    name: str
    gbps: float  # per-GPU, per-direction bandwidth in GB/s (what a ring all-reduce streams at)
    hop_latency_us: float  # NCCL's per-step hardware latency (Ring, LL protocol)
    base_latency_us: float  # NCCL's per-collective base latency (Ring, LL protocol)
    cross_node: bool

    def to_dict(self) -> dict:
        return asdict(self)


# Latencies: NCCL src/graph/tuning.cc, the cost model NCCL itself uses to pick algorithms: baseLat
# Ring/LL 6.6 us; hwLat Ring/LL NVLink 0.6 us, PCI 1.0 us, NET 2.7 us per step.
INTERCONNECTS = {
    # NVLink 3 (A100): 600 GB/s total = 300 GB/s each direction (A100 datasheet).
    "nvlink3": Interconnect("NVLink 3 (A100)", 300, 0.6, 6.6, False),
    # NVLink 4 (H100/H200 SXM): 900 GB/s total = 450 GB/s each direction (H100 datasheet).
    "nvlink4": Interconnect("NVLink 4 (H100/H200)", 450, 0.6, 6.6, False),
    # NVLink 5 (B200): 1.8 TB/s total = 900 GB/s each direction (B200 datasheet).
    "nvlink5": Interconnect("NVLink 5 (B200)", 900, 0.6, 6.6, False),
    # PCIe Gen4 x16: 16 GT/s x 16 lanes x 128/130 = 31.5 GB/s each direction (PCI-SIG PCIe 4.0 spec).
    "pcie4": Interconnect("PCIe Gen4 x16", 31.5, 1.0, 6.6, False),
    # PCIe Gen5 x16: 32 GT/s x 16 lanes x 128/130 = 63 GB/s each direction (PCI-SIG PCIe 5.0 spec).
    "pcie5": Interconnect("PCIe Gen5 x16", 63, 1.0, 6.6, False),
    # InfiniBand HDR 200 Gb/s = 25 GB/s and NDR 400 Gb/s = 50 GB/s per GPU NIC (NVIDIA ConnectX-6/-7 datasheets).
    "ib-hdr": Interconnect("InfiniBand HDR 200G", 25, 2.7, 6.6, True),
    "ib-ndr": Interconnect("InfiniBand NDR 400G", 50, 2.7, 6.6, True),
}

_GPU_ALIASES = {
    "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb", "h100": "h100-sxm",
    "h100-80gb": "h100-sxm", "h100-sxm5": "h100-sxm", "4090": "rtx-4090", "rtx4090": "rtx-4090",
    "3090": "rtx-3090", "rtx3090": "rtx-3090", "h200-141gb": "h200", "b200-180gb": "b200",
}


def get_gpu(name) -> GPU:
    """GPU preset by name (case-insensitive, a few aliases); error listing close names when unknown."""
    if isinstance(name, GPU):
        return name
    key = str(name).strip().lower().replace("_", "-")
    key = _GPU_ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, list(GPUS), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known GPUs: {', '.join(GPUS)}"
    raise InvalidArgumentError(f"unknown GPU {name!r}; {hint} (or give --gpu-mem-gib)")


def get_interconnect(name) -> Interconnect:
    if isinstance(name, Interconnect):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key in INTERCONNECTS:
        return INTERCONNECTS[key]
    close = difflib.get_close_matches(key, list(INTERCONNECTS), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(INTERCONNECTS)}"
    raise InvalidArgumentError(f"unknown interconnect {name!r}; {hint}")
