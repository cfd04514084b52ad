"""Remembered argument checks: a call whose tensors come back unchanged skips the checks it passed.

A check's proof is stored under a key of everything the check read: each tensor's ``data_ptr``, shape,
strides, dtype and device, the scalars (with their types), and the environment switches (``KVPOOL_KERNELS``, ``KVPOOL_DEBUG``, ``TRITON_INTERPRET``).
Any change gives a new key, so the checks run again; a proof is never trusted for other tensors.
Checks that read a tensor's values (``KVPOOL_DEBUG=1`` range checks, CPU sinks) are never cached: a new tensor
at the same address, even at the same version counter, may hold other values.
"""
from __future__ import annotations

import os

import torch

MAX_ENTRIES = 256  # a server calls with a few shape classes; a full cache is dropped, not evicted one by one


def tensor_key(t) -> tuple | None:
    """What a metadata check of ``t`` read: pointer, shape, strides, dtype, device (``None`` stays ``None``)."""
    if t is None:
        return None
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


# os.environ.get encodes the name on every call (~0.5 us); on POSIX its byte-keyed mirror, which every
# os.environ write updates, is read directly (~0.05 us). Elsewhere the public mapping.
_RAW_ENV = getattr(os.environ, "_data", None)
if not (os.name == "posix" and isinstance(_RAW_ENV, dict)):
    _RAW_ENV = None
_ENV_NAMES = ("KVPOOL_KERNELS", "KVPOOL_DEBUG", "TRITON_INTERPRET")
_RAW_NAMES = tuple(os.fsencode(n) for n in _ENV_NAMES)


def env_value(name: str) -> str | None:
    """``os.environ.get(name)`` at a tenth of its cost on POSIX."""
    if _RAW_ENV is not None:
        raw = _RAW_ENV.get(os.fsencode(name))
        return None if raw is None else os.fsdecode(raw)
    return os.environ.get(name)


def env_key() -> tuple:
    """The switches that change a check's verdict or the backend: (KVPOOL_KERNELS, KVPOOL_DEBUG, TRITON_INTERPRET)."""
    if _RAW_ENV is not None:
        get = _RAW_ENV.get
        return (get(_RAW_NAMES[0]), get(_RAW_NAMES[1]), get(_RAW_NAMES[2]))
    return tuple(os.environ.get(n) for n in _ENV_NAMES)


class ProofCache:
    """A bounded dict ``key -> proof`` (whatever the checks returned: resolved scalars, the backend)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.enabled = True
        self._max = max_entries
        self._proofs: dict = {}
        self.hits = 0
        self.misses = 0

    def get(self, key):
        proof = self._proofs.get(key) if self.enabled else None
        if proof is None:
            self.misses += 1
        else:
            self.hits += 1
        return proof

    def put(self, key, proof) -> None:
        if not self.enabled:
            return
        if len(self._proofs) >= self._max:
            self._proofs.clear()
        self._proofs[key] = proof

    def clear(self) -> None:
        self._proofs.clear()
        self.hits = self.misses = 0


def cacheable_env() -> tuple | None:
    """``env_key()``, or ``None`` when no proof may be cached: while tracing (``torch.compile``: no pointers)
    or with ``KVPOOL_DEBUG=1`` (its range checks read values)."""
    if torch.compiler.is_compiling():
        return None
    env = env_key()
    return env if env[1] in (None, b"", b"0", "", "0") else None
