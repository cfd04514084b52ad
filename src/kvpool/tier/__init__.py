"""The host-memory tier: evicted prefix blocks kept in pinned host memory, copied back on a hit.

- :class:`HostKVTier`: host pages + copier + host block ids, given to ``BlockTables(..., host_tier=tier)``;
  :class:`Transfers`: one step's queued copies (``tables.pop_transfers()``, run by ``tier.run``).
- :class:`HostPages`: block-major host pages of a cache's geometry (pinned when the cache is on CUDA).
- :class:`BlockCopier`: offload (side stream) and reload (current stream) of whole blocks through a
  staging buffer, one Triton launch and one large copy per run of host ids; :class:`CopyTicket`.

See docs/host_tier.md.
"""
from .copier import BlockCopier, CopyTicket
from .host_pages import HostPages
from .host_tier import HostKVTier, Transfers

__all__ = ["BlockCopier", "CopyTicket", "HostKVTier", "HostPages", "Transfers"]
