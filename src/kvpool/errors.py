"""The one small error hierarchy of kvpool.

Every message says what was wrong, the offending value, and what would fix it. Errors raised on bad
input are raised before any state changes, so a server can catch them and carry on.

Each class also derives from the built-in exception a Python user would expect (``ValueError``,
``IndexError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""


class KVPoolError(Exception):
    """Base class of every error kvpool raises on purpose."""


class InvalidArgumentError(KVPoolError, ValueError):
    """An argument has a bad value (negative count, mismatched lengths, double free, wrong dtype)."""


class BlockIndexError(KVPoolError, IndexError):
    """A block id, slot or sequence id is out of range or unknown."""


class OutOfBlocksError(KVPoolError, RuntimeError):
    """Fewer free blocks than requested; nothing was allocated.

    Attributes
    ----------
    requested : int
        Blocks asked for.
    available : int
        Blocks that could be handed out at the time of the call (evictable cached blocks included).
    """

    def __init__(self, message: str, requested: int = -1, available: int = -1):
        super().__init__(message)
        self.requested = requested
        self.available = available


class PlanError(KVPoolError, ValueError):
    """The planner's inputs are inconsistent or the deployment cannot fit (weights larger than memory, ...)."""


class ConfigError(PlanError):
    """A model config (``config.json`` or preset) is missing a field or holds an odd value."""


class KernelError(KVPoolError, ValueError):
    """A kernel was called with tensors of the wrong shape, dtype, device or stride."""


class RankMismatchError(KVPoolError, RuntimeError):
    """Ranks of one tensor-parallel group disagree (model spec, block size, settings)."""


class ProfileError(KVPoolError, RuntimeError):
    """The server's profile function failed while sizing the pool."""


class MissingDependencyError(KVPoolError, ImportError):
    """A part of kvpool needs an optional dependency that is not installed (torch, triton, ...).

    The message names the extra that installs it, e.g. ``pip install "kvpool[gpu]"``.
    """


class VirtualMemoryError(KVPoolError, RuntimeError):
    """A virtual-memory call of an elastic pool failed (out of device memory, a driver or mmap error).

    The message names the call and the driver's or the operating system's reason; the range is
    left as it was before the call.
    """


class ElasticUnavailableError(VirtualMemoryError):
    """Elastic pools on CUDA need the CUDA driver (``libcuda.so.1``) and a device, and there is none.

    Use ``backend="host"`` for CPU tests, or a static :class:`kvpool.PagedKVCache`.
    """


__all__ = [
    "KVPoolError",
    "InvalidArgumentError",
    "BlockIndexError",
    "OutOfBlocksError",
    "PlanError",
    "ConfigError",
    "KernelError",
    "RankMismatchError",
    "ProfileError",
    "MissingDependencyError",
    "VirtualMemoryError",
    "ElasticUnavailableError",
]
