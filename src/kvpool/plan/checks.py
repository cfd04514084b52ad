"""The argument validators of kvpool: one home for "a positive count", "a number of GiB", "a fraction", ...

Every public planner function (``plan_memory``, ``scale``, ``comm_report``, ``compare_interconnects``,
``NCCLSettings``, ``TPKVCachePlanner``, ``diagnose``) checks its numbers here, so a bad value is refused
whatever the caller (the command line, a notebook, a server) and never turns into a silently wrong plan
(``tp=0`` read as "default", negative NCCL channels buying KV blocks) or a ``ZeroDivisionError`` deep inside.

One message style: ``"<name> must be <what>, got <value!r>[; <fix>]"``. Each check returns the value in
canonical form (a plain ``int`` for numpy integers, a plain ``float``), so nothing odd leaks into JSON.

>>> check_positive_int("batch", 32), check_fraction("mem_fraction", 0.9), check_gib("comm_gib", 1)
(32, 0.9, 1.0)
"""
from __future__ import annotations

import math
import numbers

from ..errors import InvalidArgumentError


def _refuse(name: str, what: str, value, fix: str = ""):
    raise InvalidArgumentError(f"{name} must be {what}, got {value!r}" + (f"; {fix}" if fix else ""))


def _is_int(value) -> bool:
    """An integer of any type (int, numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int = 1, maximum: int | None = None, allow_none: bool = False,
              fix: str = ""):
    """``value`` as a plain ``int`` in ``[minimum, maximum]``; None passes when allowed.

    >>> check_int("tp_rank", 3, minimum=0, maximum=3)
    3
    """
    if value is None and allow_none:
        return None
    if maximum is not None:
        what = f"in {minimum}..{maximum}"
    else:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        _refuse(name, what, value, fix)
    return int(value)


def check_positive_int(name: str, value, allow_none: bool = True, fix: str = ""):
    """``value`` as an ``int`` if it is an integer >= 1 (numpy integers too, bools not); None passes when allowed.

    >>> check_positive_int("batch", 32)
    32
    """
    return check_int(name, value, minimum=1, allow_none=allow_none, fix=fix)


def check_block_size(value) -> int:
    """``value`` as an ``int`` if it is a positive power of two (8, 16, 32, ...): tokens per KV block.

    The one home of the rule: the planner and ``size_kv_pool`` (after its own integer check) call it.

    >>> check_block_size(16)
    16
    """
    if not _is_int(value) or value <= 0 or value & (value - 1):
        _refuse("block_size", "a positive power of two (8, 16, 32, ...)", value)
    return int(value)


def check_number(name: str, value, *, unit: str = "", positive: bool = False, allow_none: bool = False):
    """``value`` as a ``float``: a finite real number >= 0 (> 0 when ``positive``); None passes when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _refuse(name, f"a number of {unit}" if unit else "a finite number", value)
    if value < 0 or (positive and value == 0):
        if unit:
            _refuse(name, f"{'> 0' if positive else '>= 0'} {unit}", value)
        _refuse(name, "a positive number" if positive else "a non-negative number", value)
    return float(value)


def check_gib(name: str, value, strictly_positive: bool = False):
    """``value`` as a float number of GiB: finite and >= 0 (> 0 when ``strictly_positive``); None passes."""
    return check_number(name, value, unit="GiB", positive=strictly_positive, allow_none=True)


def check_fraction(name: str, value, fix: str = "") -> float:
    """``value`` as a ``float`` in (0, 1] (a share of a GPU's memory).

    >>> check_fraction("mem_fraction", 1)
    1.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        _refuse(name, "in (0, 1]", value, fix)  # NaN fails the comparison too
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices`` (names, compared exactly).

    >>> check_choice("layout", "NHD", ("NHD", "HND"))
    'NHD'
    """
    if not isinstance(value, str) or value not in choices:
        _refuse(name, f"one of {', '.join(choices)}", value)
    return value


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


__all__ = ["check_int", "check_positive_int", "check_block_size", "check_number", "check_gib", "check_fraction",
           "check_choice", "check_tp_degrees", "check_names"]
