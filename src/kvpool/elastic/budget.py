"""`MemoryBudget`: bytes of one GPU shared by elastic pools, in one process or across processes.

Each pool reserves the physical bytes it is about to map and releases what it unmaps, so the sum of
what the pools hold never exceeds the limit: one grows only when another has shrunk or slept. Across
processes the state is a small JSON file (``{"limit": bytes, "held": {pid: bytes}}``) read and rewritten
under an ``fcntl`` lock of a ``.lock`` file beside it, and replaced atomically (``os.replace``), so a
process that dies mid-write leaves the previous state. A process that dies holding bytes gives them back:
every locked access drops the entries of processes that no longer exist.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from typing import Callable, Optional

from .._arrays import as_int
from ..errors import InvalidArgumentError


class MemoryBudget:
    """A byte limit several elastic pools draw from.

    Parameters
    ----------
    limit_bytes : int, optional
        Most bytes all pools together may map. With ``path``, None adopts the limit the file holds.
    path : str or os.PathLike, optional
        A file shared by the processes of one GPU (created on first use); None: this process only.

    Examples
    --------
    >>> budget = MemoryBudget(4 << 20)
    >>> budget.try_reserve(3 << 20), budget.try_reserve(2 << 20), budget.free_bytes >> 20
    (True, False, 1)
    >>> budget.release(3 << 20); budget.used_bytes
    0
    """

    def __init__(self, limit_bytes: Optional[int] = None, path=None):
        self.path = None if path is None else os.fspath(path)
        self._thread_lock = threading.Lock()
        if limit_bytes is not None:
            limit_bytes = as_int(limit_bytes, "limit_bytes")
            if limit_bytes < 0:
                raise InvalidArgumentError(f"limit_bytes={limit_bytes} must be >= 0 (bytes the pools may map)")
        if self.path is None:
            if limit_bytes is None:
                raise InvalidArgumentError("MemoryBudget needs limit_bytes (or a path whose file holds one)")
            self._state = {"limit": limit_bytes, "held": {}}
            return
        with self._locked() as state:
            if state["limit"] is None and limit_bytes is None:
                raise InvalidArgumentError(f"the budget file {self.path} does not exist yet; pass limit_bytes to "
                                           "create it")
            if state["limit"] is not None and limit_bytes is not None and state["limit"] != limit_bytes:
                raise InvalidArgumentError(
                    f"the budget file {self.path} holds limit {state['limit']} bytes, not limit_bytes={limit_bytes}; "
                    "pass the same limit (or None to adopt the file's)")
            if state["limit"] is None:
                state["limit"] = limit_bytes

    # ----------------------------------------------------------------- state under the lock
    @contextlib.contextmanager
    def _locked(self):
        """The state, locked against other threads and processes; written back when the block ends."""
        with self._thread_lock:
            if self.path is None:
                yield self._state
                return
            with open(self.path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    state = self._read()
                    yield state
                    self._write(state)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return {"limit": None, "held": {}}
        state["held"] = {pid: n for pid, n in state["held"].items() if _alive(int(pid))}
        return state

    def _write(self, state: dict) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.path)

    @staticmethod
    def _owner() -> str:
        return str(os.getpid())

    # ----------------------------------------------------------------- reserve and release
    def reserve_within(self, choose: Callable[[int], int]) -> int:
        """Reserve ``choose(free_bytes)`` bytes atomically (``choose`` runs under the lock) and return them.

        ``choose`` gets the bytes free now and returns what to take, in ``[0, free]``: an elastic pool takes
        the bytes of the largest grow that fits.
        """
        with self._locked() as state:
            free = state["limit"] - sum(state["held"].values())
            take = int(choose(free))
            if not 0 <= take <= max(free, 0):
                raise InvalidArgumentError(f"reserve_within: chose {take} bytes with {free} free; choose in [0, free]")
            owner = self._owner()
            state["held"][owner] = state["held"].get(owner, 0) + take
            return take

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if that many are free; False (nothing reserved) otherwise."""
        nbytes = _checked_bytes(nbytes, "try_reserve")
        return self.reserve_within(lambda free: nbytes if nbytes <= free else 0) == nbytes

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` this process reserved (an error, and nothing changes, if it holds fewer)."""
        nbytes = _checked_bytes(nbytes, "release")
        with self._locked() as state:
            owner = self._owner()
            held = state["held"].get(owner, 0)
            if nbytes > held:
                raise InvalidArgumentError(f"release({nbytes}) but this process holds {held} bytes of the budget; "
                                           "release only what was reserved")
            if held == nbytes:
                state["held"].pop(owner, None)
            else:
                state["held"][owner] = held - nbytes

    # ----------------------------------------------------------------- figures
    @property
    def limit_bytes(self) -> int:
        with self._locked() as state:
            return state["limit"]

    @property
    def used_bytes(self) -> int:
        """Bytes reserved by every live process (this one included)."""
        with self._locked() as state:
            return sum(state["held"].values())

    @property
    def free_bytes(self) -> int:
        with self._locked() as state:
            return state["limit"] - sum(state["held"].values())

    def held_bytes(self) -> dict:
        """``{pid: bytes}`` of the live processes holding part of the budget."""
        with self._locked() as state:
            return {int(pid): n for pid, n in state["held"].items()}

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        return f"MemoryBudget(limit_bytes={self.limit_bytes}, used_bytes={self.used_bytes}{where})"


def _checked_bytes(nbytes, fn: str) -> int:
    nbytes = as_int(nbytes, f"{fn}(): nbytes")
    if nbytes < 0:
        raise InvalidArgumentError(f"{fn}(nbytes={nbytes}): nbytes must be >= 0")
    return nbytes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
