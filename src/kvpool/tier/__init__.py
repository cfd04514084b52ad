"""The host-memory tier: evicted prefix blocks kept in pinned host memory, copied back on a hit.

- :class:`HostPages`: block-major host pages of a cache's geometry (pinned when the cache is on CUDA).
- :class:`BlockCopier`: offload (side stream) and reload (current stream) of whole blocks through a
  staging buffer, one Triton launch and one large copy per run of host ids; :class:`CopyTicket`.

See docs/host_tier.md.
"""
from .copier import BlockCopier, CopyTicket
from .host_pages import HostPages

__all__ = ["BlockCopier", "CopyTicket", "HostPages"]
