"""How tensor (TP) and pipeline (PP) parallelism may split a model: the rules vLLM applies, each written once.

- a pipeline has at most one stage per layer;
- the TP degree divides the attention heads (each rank runs whole query heads);
- it divides the KV heads, or is a multiple of them (each KV head then replicated on ``tp // kv`` ranks);
- MLA models keep one latent per token that TP does not split, so only the first rule applies.

The planner (`check_tp`), the page cache and `shard_kv_heads` call these, so they cannot disagree.
"""
from __future__ import annotations

from ..errors import PlanError
from .checks import check_positive_int

#: Larger TP degrees the planner suggests when a deployment does not fit: GPUs come in powers of two.
TP_CANDIDATES = (2, 4, 8, 16, 32, 64)


def check_kv_head_split(num_kv_heads: int, tp: int, *, model: str = "", tp_name: str = "tp",
                        error: type[Exception] = PlanError) -> None:
    """Raise ``error`` unless ``tp`` ranks can share ``num_kv_heads`` KV heads evenly.

    >>> check_kv_head_split(8, 16)  # each head on 2 ranks
    >>> check_kv_head_split(8, 12, model="llama-3.1-8b")
    Traceback (most recent call last):
    ...
    kvpool.errors.PlanError: tp=12 exceeds the 8 KV heads of llama-3.1-8b but is not a multiple of them, so the heads cannot be replicated evenly; use a multiple of 8
    """
    of = f" of {model}" if model else ""
    if tp <= num_kv_heads and num_kv_heads % tp:
        raise error(f"{tp_name}={tp} does not divide the {num_kv_heads} KV heads{of}; use a divisor of "
                    f"{num_kv_heads} or a multiple of it")
    if tp > num_kv_heads and tp % num_kv_heads:
        raise error(f"{tp_name}={tp} exceeds the {num_kv_heads} KV heads{of} but is not a multiple of them, so "
                    f"the heads cannot be replicated evenly; use a multiple of {num_kv_heads}")


def check_tp(spec, tp) -> int:
    """``tp`` as a plain ``int`` if ``spec`` can be split over that many ranks; PlanError naming the fix if not."""
    tp = check_positive_int("tp", tp, allow_none=False)
    heads = spec.num_attention_heads
    if heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
        raise PlanError(f"tp={tp} does not divide the {heads} attention heads of {spec.name}; use one of {divisors}")
    if not spec.is_mla:
        check_kv_head_split(spec.num_kv_heads, tp, model=spec.name)
    return tp


def check_pp(spec, pp) -> int:
    """``pp`` as a plain ``int`` if ``spec`` has a layer for each of ``pp`` pipeline stages."""
    pp = check_positive_int("pp", pp, allow_none=False)
    if pp > spec.num_layers:
        raise PlanError(f"pp={pp} is larger than the {spec.num_layers} layers of {spec.name}; use pp <= {spec.num_layers}")
    return pp


def larger_tps(spec, tp: int) -> list[int]:
    """The TP degrees above ``tp`` (of `TP_CANDIDATES`) that ``spec`` can be split over, ascending."""
    out = []
    for candidate in TP_CANDIDATES:
        if candidate > tp:
            try:
                out.append(check_tp(spec, candidate))
            except PlanError:
                continue
    return out


__all__ = ["TP_CANDIDATES", "check_kv_head_split", "check_tp", "check_pp", "larger_tps"]
