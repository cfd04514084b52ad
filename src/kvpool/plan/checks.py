"""The planner's argument validators: one home for "a positive count", "a block size", "GiB", "a list of TP degrees".

Every public planner function (``plan_memory``, ``scale``, ``comm_report``, ``compare_interconnects``,
``NCCLSettings``) checks its numbers here, so a bad value is refused whatever the caller (the command
line, a notebook, a server) and never turns into a silently wrong plan (``tp=0`` read as "default",
negative NCCL channels buying KV blocks) or a ``ZeroDivisionError`` deep inside.
"""
from __future__ import annotations

import math
import numbers

from ..errors import InvalidArgumentError


def check_positive_int(name: str, value, allow_none: bool = True, fix: str = ""):
    """``value`` as an ``int`` if it is an integer >= 1 (numpy integers too, bools not); None passes when allowed.

    >>> check_positive_int("batch", 32)
    32
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}" + (f"; {fix}" if fix else ""))
    return int(value)


def check_block_size(value) -> int:
    """``value`` as an ``int`` if it is a positive power of two (8, 16, 32, ...): tokens per KV block.

    The one home of the rule: the planner and ``size_kv_pool`` (after its own integer check) call it.

    >>> check_block_size(16)
    16
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value & (value - 1):
        raise InvalidArgumentError(f"block_size must be a positive power of two (8, 16, 32, ...), got {value!r}")
    return int(value)


def check_gib(name: str, value, strictly_positive: bool = False):
    """``value`` as a float number of GiB: finite and >= 0 (> 0 when ``strictly_positive``); None passes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a number of GiB, got {value!r}")
    if value < 0 or (strictly_positive and value == 0):
        raise InvalidArgumentError(f"{name} must be {'> 0' if strictly_positive else '>= 0'} GiB, got {value!r}")
    return float(value)


def check_tp_degrees(tps) -> tuple[int, ...]:
    """TP degrees to compare, ascending and each once (speedups are relative to the smallest)."""
    try:
        degrees = list(tps)
    except TypeError:
        raise InvalidArgumentError(f"tps must be a sequence of TP degrees such as (1, 2, 4, 8), got {tps!r}") from None
    if not degrees:
        raise InvalidArgumentError("tps is empty; give at least one TP degree, e.g. (1, 2, 4, 8)")
    return tuple(sorted({check_positive_int("tp", t, allow_none=False) for t in degrees}))


def check_names(name: str, values, example: str) -> tuple[str, ...]:
    """A non-empty sequence of preset names (``links``, ...)."""
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise InvalidArgumentError(f"{name} is empty; give at least one, e.g. {example}")
    return values


__all__ = ["check_positive_int", "check_block_size", "check_gib", "check_tp_degrees", "check_names"]
