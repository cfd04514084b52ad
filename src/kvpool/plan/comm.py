"""Communication under tensor parallelism: NCCL's buffer memory and an all-reduce cost model.

Memory (per GPU, per communicator), from NCCL's own defaults (src/init.cc, src/include/*.h):

- Simple protocol: ``NCCL_BUFFSIZE`` (default 4 MiB = 1 << 22) per connection;
- LL: ``NCCL_LL_BUFFSIZE`` default 8 lines/thread x 512 threads x 8 steps x 16 B = 512 KiB;
- LL128: ``NCCL_LL128_BUFFSIZE`` default 120 elems/thread x 640 threads x 8 steps x 8 B = 4,915,200 B;
- one buffer set per channel per connected peer (ring: previous + next rank);
- NVLS (NVLink SHARP on NVSwitch systems): channels x 2 x (``NCCL_NVLS_CHUNKSIZE`` x 8 steps) x ranks
  (src/transport/nvls.cc, ``nvlsPerRankSize * nHeads``).

Plus staging buffers for the all-reduced activations of a decode batch (hidden x batch x dtype x 2 for
double buffering), once per layer only if the framework keeps per-layer buffers (``staging_layers``).

Time: one all-reduce of ``n`` bytes over ``p`` ranks on a ring costs
``base + 2(p-1) * hop + 2(p-1)/p * n / bandwidth`` (NCCL's own latency constants; see hardware.py).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import InvalidArgumentError
from .checks import check_positive_int
from .hardware import Interconnect

NCCL_STEPS = 8
SIMPLE_DEFAULT = 1 << 22
LL_DEFAULT = 8 * 512 * NCCL_STEPS * 16
LL128_DEFAULT = 120 * 640 * NCCL_STEPS * 8
NVLS_CHUNK_DEFAULT = 128 * 1024
PROTOCOLS = ("LL", "LL128", "Simple")


@dataclass(frozen=True)
class NCCLSettings:
    """The NCCL knobs that decide its memory; None means "NCCL's default for this interconnect"."""

    buffsize: int = SIMPLE_DEFAULT  # NCCL_BUFFSIZE
    ll_buffsize: int = LL_DEFAULT  # NCCL_LL_BUFFSIZE
    ll128_buffsize: int = LL128_DEFAULT  # NCCL_LL128_BUFFSIZE
    protocols: tuple = PROTOCOLS  # NCCL_PROTO
    channels: int | None = None  # NCCL_MAX_NCHANNELS (NCCL picks 16-32 on NVLink, 2-4 on PCIe)
    nvls: bool | None = None  # NCCL_NVLS_ENABLE (default: on for NVLink 4/5 switch systems)
    nvls_channels: int = 16  # NCCL_NVLS_NCHANNELS
    nvls_chunksize: int = NVLS_CHUNK_DEFAULT  # NCCL_NVLS_CHUNKSIZE
    peers: int = 2  # ring neighbours per channel (previous and next rank)
    staging_layers: int = 1  # 1: in-place all-reduce reuses one buffer; num_layers: a buffer per layer

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
        protocols = tuple(self.protocols) if isinstance(self.protocols, (tuple, list)) else None
        if not protocols or any(p not in PROTOCOLS for p in protocols):
            raise InvalidArgumentError(
                f"nccl protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols!r}; "
                "parse_protocols('^LL128') reads NCCL_PROTO syntax")

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "NCCLSettings":
        """Read ``NCCL_BUFFSIZE``, ``NCCL_LL_BUFFSIZE``, ``NCCL_LL128_BUFFSIZE``, ``NCCL_PROTO``,
        ``NCCL_MAX_NCHANNELS``, ``NCCL_NVLS_ENABLE``, ``NCCL_NVLS_NCHANNELS``, ``NCCL_NVLS_CHUNKSIZE``."""
        env = os.environ if env is None else env
        values: dict = {}
        for key, name in _ENV_NAMES.items():
            if env.get(name):
                values[key] = _env_int(env[name], name)
        if env.get("NCCL_NVLS_ENABLE"):
            values["nvls"] = env["NCCL_NVLS_ENABLE"].strip() not in ("0", "false", "False")
        if env.get("NCCL_PROTO"):
            values["protocols"] = parse_protocols(env["NCCL_PROTO"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocols"] = list(self.protocols)
        return d


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
    """NCCL's usual ring channel count: 16 on NVLink (bandwidth-bound), 2 on PCIe / network."""
    return 16 if link.name.startswith("NVLink") else 2


def nccl_buffer_bytes(tp: int, link: Interconnect, nccl: NCCLSettings) -> dict:
    """Bytes NCCL allocates on one GPU for a communicator of ``tp`` ranks over ``link``."""
    if tp <= 1:
        return {"channels": 0, "protocol_buffers": 0, "nvls": 0, "total": 0}
    channels = nccl.channels or default_channels(link)
    per_set = sum({"LL": nccl.ll_buffsize, "LL128": nccl.ll128_buffsize, "Simple": nccl.buffsize}[p]
                  for p in nccl.protocols)
    protocol = channels * nccl.peers * per_set
    nvls_on = nccl.nvls if nccl.nvls is not None else (link.name.startswith("NVLink 4") or link.name.startswith("NVLink 5"))
    nvls = nccl.nvls_channels * 2 * nccl.nvls_chunksize * NCCL_STEPS * tp if (nvls_on and tp > 2) else 0
    return {"channels": channels, "protocol_buffers": protocol, "nvls": nvls, "total": protocol + nvls}


def staging_bytes(hidden: int, batch: int, dtype_bytes: int, nccl: NCCLSettings) -> int:
    """All-reduce staging: hidden x batch x dtype x 2 (double buffering) x staging_layers."""
    return hidden * batch * dtype_bytes * 2 * nccl.staging_layers


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
           "allreduces_per_forward", "parse_protocols", "p2p_seconds"]
