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


def env_key() -> tuple:
    """The switches that change a check's verdict or the backend."""
    env = os.environ
    return (env.get("KVPOOL_KERNELS"), env.get("KVPOOL_DEBUG"), env.get("TRITON_INTERPRET"))


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


def cacheable() -> bool:
    """False while tracing (``torch.compile``: pointers do not exist) or with ``KVPOOL_DEBUG=1`` (value checks)."""
    return not torch.compiler.is_compiling() and os.environ.get("KVPOOL_DEBUG", "0") in ("", "0")
