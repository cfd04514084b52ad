"""What NCCL allocates on one GPU, read from its source (NCCL 2.27.5, the one torch 2.10 / vLLM 0.19 install;
the same arithmetic in 2.28.9, torch 2.11's).

Every figure below is a device allocation NCCL makes for a communicator on ONE rank:

- **Protocol buffers** (``init.cc`` ``computeBuffSizes``): LL = 8 lines/thread x 512 threads x ``NCCL_STEPS`` (8) x
  16 B = 512 KiB; LL128 = 120 elements/thread x 640 threads x 8 x 8 B = 4,915,200 B; Simple = ``NCCL_BUFFSIZE``
  (4 MiB). ``NCCL_PROTO`` does not shrink them: ``p2pRecvSetup`` sizes every connection for all three.
- **One P2P connection** (``transport/p2p.cc`` ``p2pSendSetup`` / ``p2pRecvSetup``): the receiver allocates
  ``sizeof(ncclRecvMem)`` (4,096 B, ``comm.h`` ``MEM_ALIGN``) + LL + LL128 + Simple, the sender
  ``sizeof(ncclSendMem)`` (4,096 B); with P2P read (Ampere over NVLink only, ``graph/paths.cc``
  ``ncclTopoCheckP2p``: ``cudaCompCap == 80``) the Simple buffer moves to the sender. Each is rounded up to
  ``CUDA_IPC_MIN`` (2 MiB, ``comm.h``), so on Hopper a connection costs 10 MiB (receiver) + 2 MiB (sender). The
  peer maps these through cuMem handles (no memory on the peer's GPU).
- **Communicator set-up** (``init.cc``, ``channel.cc`` ``initChannel``): 3 device arrays per channel for
  ``pow2Up(coll channels)`` channels (``graph/paths.cc`` ``ncclTopoComputeP2pChannels``), 2 for ``devCommSetup``,
  and with NVLS one more per collective channel plus the credit buffer (``transport/nvls.cc`` ``ncclNvlsSetup``).
  With cuMem (``NCCL_CUMEM_ENABLE``, on by default) each is a ``cuMemCreate`` rounded up to the minimum
  allocation granularity, 2 MiB on Ampere/Hopper (``include/alloc.h`` ``ncclCuMemAlloc``).
- **Connections made lazily** (``NCCL_RUNTIME_CONNECT=1``, the default with cuMem, ``init.cc``): ring channels are
  connected by the first collective that picks Ring (``transport/generic.cc`` ``ncclTransportRingConnect``: one
  receive + one send connection per channel), NVLS buffers by the first NVLS collective
  (``ncclNvlsBufferSetup``: ``NCCL_NVLS_NCHANNELS`` x 2 x ``NCCL_NVLS_CHUNKSIZE`` x 8 steps x ranks).
  Without runtime connect, ``initTransportsRank`` connects ring, tree and NVLS at init.

>>> conn = connection_bytes(NCCLBufferSizes())  # Hopper: receiver 10 MiB, sender 2 MiB
>>> conn.recv >> 20, conn.send >> 20
(10, 2)
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
NCCL_STEPS = 8  # include/device.h
SIMPLE_DEFAULT = 1 << 22  # init.cc DEFAULT_BUFFSIZE
LL_DEFAULT = 8 * 512 * NCCL_STEPS * 16  # NCCL_LL_LINES_PER_THREAD x NCCL_LL_MAX_NTHREADS x steps x sizeof(ncclLLFifoLine)
LL128_DEFAULT = 120 * 640 * NCCL_STEPS * 8  # NCCL_LL128_ELEMS_PER_THREAD x NCCL_LL128_MAX_NTHREADS x steps x 8 B
NVLS_CHUNK_DEFAULT = 128 * 1024  # transport/nvls.cc NCCL_NVLS_CHUNKSIZE
NVLS_CHANNELS_SM90 = 16  # transport/nvls.cc NVLS_NCHANNELS_SM90
CONN_MEM = 4096  # sizeof(ncclSendMem) == sizeof(ncclRecvMem): a union padded to MEM_ALIGN (include/comm.h)
CUDA_IPC_MIN = 2 * MIB  # include/comm.h: every P2P buffer is aligned to it
CUMEM_GRANULARITY = 2 * MIB  # cuMemGetAllocationGranularity(MINIMUM) on Ampere/Hopper device memory
ARRAYS_PER_CHANNEL = 3  # channel.cc initChannel: sharedRes->devPeers, channel->devPeers, devRingUserRanks
DEV_COMM_ARRAYS = 2  # init.cc devCommSetup: devCommAndChans, rankToLocalRank
SMALL_ARRAY = 4096  # a device array of a few pointers per rank (far below one granule)


def round_up(nbytes: int, unit: int) -> int:
    """``nbytes`` rounded up to a multiple of ``unit``.

    >>> round_up(9_637_888, 2 << 20)  # 4,096 + LL + LL128 + Simple -> 10 MiB
    10485760
    """
    return -(-nbytes // unit) * unit


@dataclass(frozen=True)
class NCCLBufferSizes:
    """The knobs that size NCCL's device allocations (NCCL's defaults unless the environment says otherwise)."""

    simple: int = SIMPLE_DEFAULT  # NCCL_BUFFSIZE
    ll: int = LL_DEFAULT  # NCCL_LL_BUFFSIZE
    ll128: int = LL128_DEFAULT  # NCCL_LL128_BUFFSIZE
    cumem: bool = True  # NCCL_CUMEM_ENABLE: cuMem allocations, rounded to the 2 MiB granule
    p2p_read: bool = False  # Ampere over NVLink: the Simple buffer on the sender

    def device_alloc(self, nbytes: int) -> int:
        """One NCCL device allocation: a cuMem granule multiple with cuMem, else cudaMalloc's own size."""
        return round_up(nbytes, CUMEM_GRANULARITY) if self.cumem else nbytes


@dataclass(frozen=True)
class ConnectionBytes:
    """One P2P connection's device memory on the receiving and on the sending rank, in bytes."""

    recv: int
    send: int

    @property
    def pair(self) -> int:
        """A rank's receive + send connection of one ring channel (previous and next rank)."""
        return self.recv + self.send


def connection_bytes(sizes: NCCLBufferSizes) -> ConnectionBytes:
    """Bytes of one P2P connection (``p2pRecvSetup`` / ``p2pSendSetup``), each rounded to ``CUDA_IPC_MIN``."""
    recv = CONN_MEM + sizes.ll + sizes.ll128 + (0 if sizes.p2p_read else sizes.simple)
    send = CONN_MEM + (sizes.simple if sizes.p2p_read else 0)
    return ConnectionBytes(sizes.device_alloc(round_up(recv, CUDA_IPC_MIN)),
                           sizes.device_alloc(round_up(send, CUDA_IPC_MIN)))


def p2p_channels(coll_channels: int) -> int:
    """``ncclTopoComputeP2pChannels``: the P2P channel count is the collective count rounded up to a power of 2.

    >>> p2p_channels(24)
    32
    """
    return 1 << (coll_channels - 1).bit_length()


def setup_bytes(coll_channels: int, nvls: bool, sizes: NCCLBufferSizes) -> int:
    """Device arrays ``ncclCommInitRank`` allocates before any connection (channels, devComm, NVLS peers)."""
    arrays = p2p_channels(coll_channels) * ARRAYS_PER_CHANNEL + DEV_COMM_ARRAYS
    if nvls:  # initNvlsChannel per collective channel + the NVLS credit buffer
        arrays += coll_channels + 1
    return arrays * sizes.device_alloc(SMALL_ARRAY)


def ring_bytes(coll_channels: int, sizes: NCCLBufferSizes, peers: int = 2) -> int:
    """A ring's connections on one rank: per channel, ``peers // 2`` receive + send pairs (previous, next rank)."""
    return coll_channels * (peers // 2) * connection_bytes(sizes).pair


def nvls_buffer_bytes(ranks: int, nvls_channels: int, chunk: int, sizes: NCCLBufferSizes) -> int:
    """``ncclNvlsBufferSetup``: channels x 2 (reduce, broadcast) x chunk x 8 steps x heads (one per rank).

    >>> nvls_buffer_bytes(4, 16, 128 * 1024, NCCLBufferSizes()) >> 20  # 16 x 2 x 1 MiB x 4
    128
    """
    return sizes.device_alloc(nvls_channels * 2 * chunk * NCCL_STEPS * ranks)


__all__ = ["NCCLBufferSizes", "ConnectionBytes", "connection_bytes", "p2p_channels", "setup_bytes", "ring_bytes",
           "nvls_buffer_bytes", "round_up", "NCCL_STEPS", "SIMPLE_DEFAULT", "LL_DEFAULT", "LL128_DEFAULT",
           "NVLS_CHUNK_DEFAULT", "NVLS_CHANNELS_SM90", "CUDA_IPC_MIN", "CUMEM_GRANULARITY"]
