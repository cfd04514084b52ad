"""Communication under tensor parallelism: NCCL's settings, its buffer memory and an all-reduce cost model.

Memory: what NCCL allocates per communicator is computed in `kvpool.plan.nccl_buffers` (read from NCCL's
source); which communicators vLLM 0.19 creates, and whether before or after its start-up snapshot, in
`kvpool.plan.vllm_comm`. This module holds the knobs (``NCCL_*`` variables, ``--nccl-*`` flags) and
`nccl_buffer_bytes`, one communicator's memory.

Time: one all-reduce of ``n`` bytes over ``p`` ranks on a ring costs
``base + 2(p-1) * hop + 2(p-1)/p * n / bandwidth`` (NCCL's own latency constants; see hardware.py).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import InvalidArgumentError
from .checks import check_positive_int
from .hardware import Interconnect
from .nccl_buffers import (LL128_DEFAULT, LL_DEFAULT, NCCL_STEPS, NVLS_CHANNELS_SM90, NVLS_CHUNK_DEFAULT,
                           SIMPLE_DEFAULT, NCCLBufferSizes, nvls_buffer_bytes, ring_bytes, setup_bytes)

PROTOCOLS = ("LL", "LL128", "Simple")
# Collective channels NCCL builds (NCCL_DEBUG=INFO "N coll channels"): 24 on NVSwitch boards, READ in published
# logs (8 x H100 on AWS p5.48xlarge: "24 coll channels, 16 nvls channels, 32 p2p channels"; 4 x H100 under vLLM,
# vllm-project/vllm#10453: channels 00-23; A100 SXM4: "24 coll channels"). The ring search depends on each GPU's
# NVLink bandwidth to the switch, not on the GPU count, so tp 2 gets the same (estimate). PCIe / network: 2
# (estimate). NCCL_MAX_NCHANNELS / --nccl-channels give the count instead.
NVLINK_COLL_CHANNELS = 24
PCIE_COLL_CHANNELS = 2


@dataclass(frozen=True)
class NCCLSettings:
    """The NCCL knobs that decide its memory; None means "NCCL's default for this interconnect"."""

    buffsize: int = SIMPLE_DEFAULT  # NCCL_BUFFSIZE
    ll_buffsize: int = LL_DEFAULT  # NCCL_LL_BUFFSIZE
    ll128_buffsize: int = LL128_DEFAULT  # NCCL_LL128_BUFFSIZE
    protocols: tuple = PROTOCOLS  # NCCL_PROTO: picks algorithms; buffers are allocated for all three (p2p.cc)
    channels: int | None = None  # collective channels (NCCL_MAX_NCHANNELS; default 24 on NVLink, 2 on PCIe)
    nvls: bool | None = None  # NCCL_NVLS_ENABLE (default: on for multicast NVSwitch boards with > 2 ranks)
    nvls_channels: int = NVLS_CHANNELS_SM90  # NCCL_NVLS_NCHANNELS
    nvls_chunksize: int = NVLS_CHUNK_DEFAULT  # NCCL_NVLS_CHUNKSIZE
    peers: int = 2  # ring neighbours per channel (previous and next rank): one receive + one send connection
    staging_layers: int = 1  # all-reduce staging buffers a framework keeps beyond vLLM's (1: none extra)
    cumem: bool = True  # NCCL_CUMEM_ENABLE: cuMem allocations (2 MiB granules) and, with it, runtime connect
    runtime_connect: bool = True  # NCCL_RUNTIME_CONNECT: connect each algorithm when a collective first needs it

    def __post_init__(self):
        # a negative or zero size would shrink the communication term and buy KV blocks that do not exist
        for key, env in _ENV_NAMES.items():
            value = getattr(self, key)
            if key == "channels" and value is None:
                continue
            flag = f" (--{_FLAG_NAMES[key]})" if key in _FLAG_NAMES else ""
            check_positive_int(f"nccl {key}", value, allow_none=False,
                               fix=f"give {env}{flag} a value >= 1, or leave it unset for NCCL's default")
        check_positive_int("nccl peers", self.peers, allow_none=False, fix="a ring has 2 (previous and next rank)")
        check_positive_int("nccl staging_layers", self.staging_layers, allow_none=False,
                           fix="--staging-layers is 1 (one reused buffer) or the number of layers")
        if self.nvls is not None and not isinstance(self.nvls, bool):
            raise InvalidArgumentError(f"nccl nvls must be True, False or None (NCCL's default), got {self.nvls!r}")
        for key in ("cumem", "runtime_connect"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidArgumentError(f"nccl {key} must be True or False, got {getattr(self, key)!r}")
        protocols = tuple(self.protocols) if isinstance(self.protocols, (tuple, list)) else None
        if not protocols or any(p not in PROTOCOLS for p in protocols):
            raise InvalidArgumentError(
                f"nccl protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols!r}; "
                "parse_protocols('^LL128') reads NCCL_PROTO syntax")

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "NCCLSettings":
        """Read ``NCCL_BUFFSIZE``, ``NCCL_LL_BUFFSIZE``, ``NCCL_LL128_BUFFSIZE``, ``NCCL_PROTO``,
        ``NCCL_MAX_NCHANNELS``, ``NCCL_NVLS_ENABLE``, ``NCCL_NVLS_NCHANNELS``, ``NCCL_NVLS_CHUNKSIZE``,
        ``NCCL_CUMEM_ENABLE``, ``NCCL_RUNTIME_CONNECT``."""
        env = os.environ if env is None else env
        values: dict = {}
        for key, name in _ENV_NAMES.items():
            if env.get(name):
                values[key] = _env_int(env[name], name)
        for key, name in (("nvls", "NCCL_NVLS_ENABLE"), ("cumem", "NCCL_CUMEM_ENABLE"),
                          ("runtime_connect", "NCCL_RUNTIME_CONNECT")):
            if env.get(name):
                values[key] = env[name].strip() not in ("0", "false", "False")
        if env.get("NCCL_PROTO"):
            values["protocols"] = parse_protocols(env["NCCL_PROTO"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocols"] = list(self.protocols)
        return d

    def buffer_sizes(self, p2p_read: bool = False) -> NCCLBufferSizes:
        """The sizes NCCL's allocations follow; ``p2p_read`` for Ampere (compute capability 8.0) over NVLink."""
        return NCCLBufferSizes(self.buffsize, self.ll_buffsize, self.ll128_buffsize, self.cumem, p2p_read)

    @property
    def lazy_connect(self) -> bool:
        """NCCL connects algorithms at their first use (init.cc: ``runtimeConn = cuMemSupport && RUNTIME_CONNECT``)."""
        return self.cumem and self.runtime_connect


_ENV_NAMES = {"buffsize": "NCCL_BUFFSIZE", "ll_buffsize": "NCCL_LL_BUFFSIZE", "ll128_buffsize": "NCCL_LL128_BUFFSIZE",
              "channels": "NCCL_MAX_NCHANNELS", "nvls_channels": "NCCL_NVLS_NCHANNELS",
              "nvls_chunksize": "NCCL_NVLS_CHUNKSIZE"}
_FLAG_NAMES = {"buffsize": "nccl-buffsize", "channels": "nccl-channels"}  # the two with a kvpool flag


def _env_int(text, name: str) -> int:
    """An NCCL environment variable's integer (decimal or 0x hex), checked positive."""
    try:
        value = int(str(text), 0)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be an integer, got {text!r}") from None
    return check_positive_int(name, value, allow_none=False)


def parse_protocols(text: str) -> tuple:
    """NCCL_PROTO syntax: "LL,LL128,Simple" enables those; "^LL128" disables those listed."""
    text = text.strip()
    negate = text.startswith("^")
    names = [t.strip().lower() for t in text.lstrip("^").split(",") if t.strip()]
    known = {p.lower(): p for p in PROTOCOLS}
    bad = [n for n in names if n not in known]
    if bad:
        raise InvalidArgumentError(f"NCCL_PROTO lists unknown protocol(s) {bad}; use LL, LL128, Simple")
    chosen = [p for p in PROTOCOLS if (p.lower() in names) != negate]
    if not chosen:
        raise InvalidArgumentError(f"NCCL_PROTO={text!r} leaves no protocol enabled")
    return tuple(chosen)


def default_channels(link: Interconnect) -> int:
    """NCCL's collective channel count: 24 on NVLink (readings, see `NVLINK_COLL_CHANNELS`), 2 on PCIe / network."""
    return NVLINK_COLL_CHANNELS if link.name.startswith("NVLink") else PCIE_COLL_CHANNELS


def nvls_default(link: Interconnect) -> bool:
    """NVLS without a GPU preset to ask: NVLink 4/5 switch systems (H100/H200/B200 SXM) support multicast."""
    return link.name.startswith("NVLink 4") or link.name.startswith("NVLink 5")


def nccl_buffer_bytes(tp: int, link: Interconnect, nccl: NCCLSettings, *, p2p_read: bool = False,
                      multicast: bool | None = None) -> dict:
    """Bytes NCCL allocates on one GPU for a communicator of ``tp`` ranks whose ring and NVLS are connected.

    ``setup`` is what ``ncclCommInitRank`` allocates, ``protocol_buffers`` the ring's connections (all three
    protocols, `kvpool.plan.nccl_buffers.ring_bytes`), ``nvls`` the NVLS buffers when NVLS is on (more than 2
    ranks, ``transport/nvls.cc``; ``multicast`` says whether the GPUs support it, default: NVLink 4/5).
    """
    if tp <= 1:
        return {"channels": 0, "setup": 0, "protocol_buffers": 0, "nvls": 0, "total": 0}
    channels = nccl.channels or default_channels(link)
    sizes = nccl.buffer_sizes(p2p_read)
    supported = nvls_default(link) if multicast is None else multicast
    nvls_on = tp > 2 and (nccl.nvls if nccl.nvls is not None else supported)
    setup = setup_bytes(channels, nvls_on, sizes)
    ring = ring_bytes(channels, sizes, nccl.peers)
    nvls = nvls_buffer_bytes(tp, nccl.nvls_channels, nccl.nvls_chunksize, sizes) if nvls_on else 0
    return {"channels": channels, "setup": setup, "protocol_buffers": ring, "nvls": nvls,
            "total": setup + ring + nvls}


def staging_bytes(hidden: int, batch: int, dtype_bytes: int, nccl: NCCLSettings) -> int:
    """Staging a framework keeps beyond vLLM's (whose all-reduce outputs are torch activations and whose custom
    all-reduce buffers exist before its snapshot): ``staging_layers - 1`` double-buffered decode batches."""
    return hidden * batch * dtype_bytes * 2 * (nccl.staging_layers - 1)


def allreduce_seconds(nbytes: float, ranks: int, link: Interconnect) -> float:
    """Ring all-reduce time: latency + 2(p-1)/p x bytes / bandwidth (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1)
    latency = (link.base_latency_us + steps * link.hop_latency_us) * 1e-6
    return latency + steps / ranks * nbytes / (link.gbps * 1e9)


def p2p_seconds(nbytes: float, link: Interconnect) -> float:
    """One point-to-point send (pipeline stage boundary)."""
    return (link.base_latency_us + link.hop_latency_us) * 1e-6 + nbytes / (link.gbps * 1e9)


def allreduces_per_forward(spec, tp: int) -> int:
    """Two per layer (after attention's o_proj and the MLP's down_proj) plus the vocab-parallel embedding."""
    return 0 if tp <= 1 else 2 * spec.num_layers + 1


def forward_comm(spec, tp: int, tokens: int, dtype_bytes: int, link: Interconnect) -> dict:
    """All-reduce count, bytes and seconds of one forward pass over ``tokens`` tokens."""
    count = allreduces_per_forward(spec, tp)
    nbytes = tokens * spec.hidden_size * dtype_bytes
    each = allreduce_seconds(nbytes, tp, link)
    # the LM head's vocab shards are gathered for the sampled tokens: (p-1)/p of the logits move
    gather = 0.0
    if tp > 1:
        gather = (link.base_latency_us + (tp - 1) * link.hop_latency_us) * 1e-6 + \
            (tp - 1) / tp * tokens * spec.vocab_size * dtype_bytes / (link.gbps * 1e9)
    return {"allreduces": count, "bytes_per_allreduce": nbytes, "seconds_per_allreduce": each,
            "logits_gather_seconds": gather, "seconds": count * each + gather}


__all__ = ["NCCLSettings", "nccl_buffer_bytes", "staging_bytes", "allreduce_seconds", "forward_comm",
           "allreduces_per_forward", "parse_protocols", "p2p_seconds", "default_channels", "nvls_default",
           "NCCL_STEPS", "SIMPLE_DEFAULT", "LL_DEFAULT", "LL128_DEFAULT", "NVLS_CHUNK_DEFAULT"]
