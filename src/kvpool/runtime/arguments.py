"""The scalar arguments of ``size_kv_pool``, checked and written one way.

Every rank hashes its settings into a digest that must match the others'; so each value is brought to
one canonical form first (a plain ``int`` for any integer type, a plain ``float``, a zero headroom as
``0`` whether written ``0`` or ``0.0``), or equal settings written differently would be a mismatch.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional, Union

from .. import errors
from ..plan.checks import check_block_size

#: Largest integer a byte count or a token count may be: what an int64 collective tensor holds, and far
#: beyond any device.
MAX_INT = 2**63 - 1


def as_int(name: str, value: Any, *, minimum: int, unit: str = "") -> int:
    """``value`` as a plain ``int`` in ``[minimum, MAX_INT]``.

    Any integer type is accepted (``int``, numpy integers, anything with ``__index__``); ``bool`` and
    floats are not, even when integral (``16.0``): a float where an integer belongs is a caller's slip.

    >>> import numpy as np
    >>> as_int("block_size", np.int64(16), minimum=1)
    16
    """
    what = f"{'a positive' if minimum == 1 else 'a non-negative'} integer{' number of ' + unit if unit else ''}"
    if isinstance(value, bool):
        raise errors.InvalidArgumentError(f"{name} must be an integer, not a bool; got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise errors.InvalidArgumentError(
            f"{name} must be an integer (int, numpy integer or anything with __index__) - {what} - "
            f"got {value!r} ({type(value).__name__})"
        ) from None
    if number < minimum:
        raise errors.InvalidArgumentError(f"{name} must be {what}, got {value!r}")
    if number > MAX_INT:
        raise errors.InvalidArgumentError(
            f"{name}={number} is more than {MAX_INT} (2**63 - 1), beyond any device; pass the real figure"
            + (f" in {unit}" if unit else "")
        )
    return int(number)


def as_optional_bytes(name: str, value: Any, *, positive: bool = False) -> Optional[int]:
    """``None`` stays ``None``; else ``as_int`` with ``bytes`` as the unit."""
    return None if value is None else as_int(name, value, minimum=1 if positive else 0, unit="bytes")


def as_block_size(value: Any) -> int:
    """Any integer type (``as_int``'s rule and messages), then the planner's power-of-two rule."""
    return check_block_size(as_int("block_size", value, minimum=1))


def _as_finite_real(name: str, value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise errors.InvalidArgumentError(f"{name} must be {expected}, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise errors.InvalidArgumentError(f"{name} must be finite, got {value!r}: pass {expected}")
    return number


def as_mem_fraction(value: Any) -> float:
    fraction = _as_finite_real("mem_fraction", value, "a number in (0, 1]")
    if not 0 < fraction <= 1:
        raise errors.InvalidArgumentError(f"mem_fraction must be in (0, 1], got {value!r}")
    return fraction


def as_headroom(value: Any) -> Union[int, float]:
    """An integer is bytes (a plain ``int``); a float is a fraction of total memory in [0, 1) (a plain
    ``float``), except that a zero fraction is the ``int`` 0, so ``0`` and ``0.0`` are one setting."""
    expected = "an int number of bytes >= 0 or a float fraction of total memory in [0, 1)"
    if not isinstance(value, bool) and hasattr(value, "__index__"):
        return as_int("headroom", value, minimum=0, unit="bytes")
    fraction = _as_finite_real("headroom", value, expected)
    if not 0 <= fraction < 1:
        raise errors.InvalidArgumentError(f"headroom must be {expected}, got {value!r}")
    return fraction if fraction else 0


def as_fp8_scales(value: Any) -> str:
    """Scale-layout names are lower case (the planner checks the name itself)."""
    return value.strip().lower() if isinstance(value, str) else value

