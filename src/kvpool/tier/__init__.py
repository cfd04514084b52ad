"""The host-memory tier: evicted prefix blocks kept in pinned host memory, copied back on a hit.

- :class:`HostKVTier`: host pages + copier + host block ids, given to ``BlockTables(..., host_tier=tier)``;
  :class:`Transfers`: one step's queued copies (``tables.pop_transfers()``, run by ``tier.run``).
- :class:`HostPages`: block-major host pages of a cache's geometry (pinned when the cache is on CUDA).
- :class:`BlockCopier`: offload (side stream) and reload (current stream) of whole blocks through a
  staging buffer, one Triton launch and one large copy per run of host ids; :class:`CopyTicket`.

The torch-backed classes (``HostPages``, ``BlockCopier``, ``CopyTicket``) load on first use, so importing
this package needs no torch. See docs/host_tier.md and docs/host_tier_protocol.md.
"""
import importlib

from .host_tier import HostKVTier, Transfers

_LAZY = {"BlockCopier": ".copier", "CopyTicket": ".copier", "HostPages": ".host_pages"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BlockCopier", "CopyTicket", "HostKVTier", "HostPages", "Transfers"]
