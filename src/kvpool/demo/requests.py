"""Requests and a seeded arrival generator for the demo.

Time is a logical clock counted in engine steps, so a run (and every TP rank's copy of the
scheduler) is deterministic: the same seed gives the same arrivals, batches and block ids.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Request:
    """One generation request.

    Attributes
    ----------
    req_id : int
    prompt : list[int]
        Prompt token ids (validated by the scheduler, not here: the demo must survive bad ones).
    max_new_tokens : int
        Tokens to generate (no EOS: the tiny random model has none).
    arrival_step : int
        Engine step at which the request arrives.
    cache_salt : str, optional
        Per-tenant prefix-cache salt (vLLM's ``cache_salt``): requests share cached blocks only
        with requests of the same salt. None: no salt.
    """

    req_id: int
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0
    cache_salt: str | None = None


@dataclass
class RequestResult:
    """What became of a request: its tokens, or the error that refused it."""

    req_id: int
    prompt_len: int
    output: list[int] = field(default_factory=list)
    error: str | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    first_step: int | None = None
    finish_step: int | None = None


def make_workload(num_requests: int, vocab_size: int, seed: int = 0, *, num_prefixes: int = 3,
                  prefix_len: tuple[int, int] = (16, 48), suffix_len: tuple[int, int] = (1, 24),
                  new_tokens: tuple[int, int] = (4, 24), mean_gap: float = 1.5, tenants: int = 0) -> list[Request]:
    """Seeded requests arriving over time, many sharing one of a few "system prompt" prefixes.

    Arrival gaps are exponential (mean ``mean_gap`` steps, rounded down), so bursts and quiet
    stretches both occur; prompt and output lengths are uniform in the given inclusive ranges.
    With ``tenants > 0`` request ``i`` belongs to tenant ``i % tenants`` and carries its cache salt
    (``"tenant-<t>"``): the tenants send the same prompts but never share cached blocks.
    """
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab_size) for _ in range(rng.randint(*prefix_len))] for _ in range(num_prefixes)]
    requests, clock = [], 0.0
    for i in range(num_requests):
        clock += rng.expovariate(1.0 / mean_gap) if mean_gap > 0 else 0.0
        suffix = [rng.randrange(vocab_size) for _ in range(rng.randint(*suffix_len))]
        prompt = (rng.choice(prefixes) if prefixes and rng.random() < 0.75 else []) + suffix
        salt = f"tenant-{i % tenants}" if tenants > 0 else None
        requests.append(Request(i, prompt, rng.randint(*new_tokens), int(clock), salt))
    return requests
