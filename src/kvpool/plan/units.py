"""Byte units, and the two ways the planner shows bytes as GiB (only at its edges: JSON and text).

Inside the planner every figure is an ``int`` number of bytes; GiB appear only when a plan is written
out, so no figure is ever rebuilt from a rounded GiB value.

>>> gib(40_479_260_672), gib_text(40_479_260_672)
(37.6992, '37.70 GiB')
"""
from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30


def gib(nbytes: float) -> float:
    """``nbytes`` in GiB rounded to 4 decimals: the figures of ``kvpool plan --json``."""
    return round(nbytes / GIB, 4)


def gib_text(nbytes: float) -> str:
    """``nbytes`` as text with two decimals, e.g. ``"37.70 GiB"``."""
    return f"{nbytes / GIB:.2f} GiB"


__all__ = ["MIB", "GIB", "gib", "gib_text"]
