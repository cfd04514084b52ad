"""A vLLM start-up log, read: the settings it ran with and the memory figures it measured.

``kvpool plan --vllm-log FILE`` plans the same deployment and prints each figure beside the plan's, so an
operator sees which term differs and by how much. Lines read (vLLM 0.19 formats; a worker's prefix such
as ``(Worker_TP1 pid=42)`` is ignored; the first TP rank's figures are kept, the KV pool is the smallest
any rank logged, as vLLM keeps the minimum over the group):

- ``Initializing a V1 LLM engine (v0.19.0) with config: model='…', dtype=torch.bfloat16, max_seq_len=…,
  tensor_parallel_size=…, pipeline_parallel_size=…, enforce_eager=…, kv_cache_dtype=…, …``
- ``non-default args: {…}`` (a Python dict: ``gpu_memory_utilization``, ``max_num_seqs``,
  ``max_num_batched_tokens``, ``block_size``, …)
- ``Model loading took X GiB memory`` (``weights_memory``), ``Available KV cache memory: X GiB``,
  ``GPU KV cache size: N tokens``, ``Maximum concurrency for L tokens per request: Xx``
- at debug level, ``torch peak memory increase: X GiB; non-torch forward increase memory: X GiB``

vLLM prints GiB with two decimals, so a logged figure is known to ±0.005 GiB.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError
from .units import GIB

_GIB = r"([0-9]+(?:\.[0-9]+)?)\s*GiB"
_FIGURES = {
    "weights": re.compile(r"Model loading took " + _GIB),
    "kv": re.compile(r"Available KV cache memory: " + _GIB),
    "activation": re.compile(r"torch peak memory increase: " + _GIB),
    "non_torch": re.compile(r"non-torch forward increase memory: " + _GIB),
}
_TOKENS = re.compile(r"GPU KV cache size: ([0-9,]+) tokens")
_CONCURRENCY = re.compile(r"Maximum concurrency for ([0-9,]+) tokens per request: ([0-9.]+)x")
_ENGINE = re.compile(r"LLM engine \(v([^)]+)\) with config: (.*)$")
_NON_DEFAULT = re.compile(r"non-default args: (\{.*\})\s*$")
# config-string fields -> plan_memory settings
_CONFIG_FIELDS = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp", "max_seq_len": "max_model_len"}
# `vllm serve` arguments (non-default args) -> plan_memory settings
_ARGS = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp", "max_model_len": "max_model_len",
         "gpu_memory_utilization": "mem_fraction", "max_num_seqs": "max_seqs",
         "max_num_batched_tokens": "max_batched_tokens", "block_size": "block_size", "kv_cache_dtype": "kv_dtype",
         "enforce_eager": "enforce_eager", "dtype": "dtype"}
_KV_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class VLLMLog:
    """What one vLLM start-up log says. Figures in bytes (None when the log lacks the line).

    Attributes
    ----------
    version, model : str or None
        vLLM's version and the model it served.
    settings : dict
        `kvpool.plan.plan_memory` keyword arguments the log fixes (``tp``, ``pp``, ``max_model_len``,
        ``mem_fraction``, ``max_seqs``, ``max_batched_tokens``, ``block_size``, ``kv_dtype``, ``dtype``,
        ``enforce_eager``).
    weights, kv, activation, non_torch : int or None
        ``weights_memory``, the available KV bytes, ``torch_peak_increase``, ``non_torch_increase``.
    kv_tokens : int or None
        "GPU KV cache size".
    concurrency : tuple (max_model_len, float) or None
        "Maximum concurrency for L tokens per request: Xx".
    """

    version: str | None = None
    model: str | None = None
    settings: dict = field(default_factory=dict)
    weights: int | None = None
    kv: int | None = None
    activation: int | None = None
    non_torch: int | None = None
    kv_tokens: int | None = None
    concurrency: tuple | None = None


def _config_settings(config: str) -> tuple[str | None, dict]:
    """The model and the settings of vLLM's engine config string (``key=value, …``)."""
    model = re.search(r"\bmodel='([^']*)'", config)
    out = {}
    for key, name in _CONFIG_FIELDS.items():
        m = re.search(rf"\b{key}=([0-9]+)\b", config)
        if m:
            out[name] = int(m.group(1))
    m = re.search(r"\bdtype=torch\.(\w+)", config)
    if m:
        out["dtype"] = m.group(1)
    m = re.search(r"\bkv_cache_dtype=(\w+)", config)
    if m and m.group(1) in _KV_DTYPES:
        out["kv_dtype"] = _KV_DTYPES[m.group(1)]
    m = re.search(r"\benforce_eager=(True|False)\b", config)
    if m:
        out["enforce_eager"] = m.group(1) == "True"
    return (model.group(1) if model else None), out


def _arg_settings(text: str) -> tuple[str | None, dict]:
    """The model and settings of a ``non-default args: {…}`` dict (values vLLM's parser produced)."""
    try:
        args = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None, {}  # a dict holding objects (e.g. a compilation config) is not a literal: skip it
    out = {}
    for key, name in _ARGS.items():
        value = args.get(key)
        if value is None:
            continue
        if name == "kv_dtype":
            value = _KV_DTYPES.get(str(value))
            if value is None:
                continue
        out[name] = value
    model = args.get("model") or args.get("model_tag")
    return (str(model) if model else None), out


def parse_vllm_log(text: str, source: str = "vLLM log") -> VLLMLog:
    """Read a vLLM start-up log; InvalidArgumentError when it holds none of the lines above."""
    log = VLLMLog()
    kv_seen = []
    for line in text.splitlines():
        if m := _ENGINE.search(line):
            log.version = m.group(1)
            model, settings = _config_settings(m.group(2))
            log.model = log.model or model
            log.settings = {**settings, **log.settings}  # non-default args, read first or later, win
            continue
        if m := _NON_DEFAULT.search(line):
            model, settings = _arg_settings(m.group(1))
            log.model = model or log.model
            log.settings.update(settings)
            continue
        for name, pattern in _FIGURES.items():
            if m := pattern.search(line):
                value = round(float(m.group(1)) * GIB)
                if name == "kv":
                    kv_seen.append(value)
                elif getattr(log, name) is None:
                    setattr(log, name, value)
        if log.kv_tokens is None and (m := _TOKENS.search(line)):
            log.kv_tokens = int(m.group(1).replace(",", ""))
        if log.concurrency is None and (m := _CONCURRENCY.search(line)):
            log.concurrency = (int(m.group(1).replace(",", "")), float(m.group(2)))
    log.kv = min(kv_seen) if kv_seen else None
    if log.version is None and log.weights is None and log.kv is None and log.kv_tokens is None:
        raise InvalidArgumentError(
            f"{source} holds none of vLLM's start-up lines ('Initializing a V1 LLM engine', 'Model loading took', "
            "'Available KV cache memory', 'GPU KV cache size'); give the log of a `vllm serve` start-up")
    return log


def read_vllm_log(path: str) -> VLLMLog:
    """`parse_vllm_log` of the file at ``path`` (InvalidArgumentError naming it when unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the vLLM log {path!r}: {exc.strerror}") from None
    return parse_vllm_log(text, source=repr(path))


@dataclass(frozen=True)
class LogRow:
    """One figure of the log beside the plan's: ``error`` = plan − log, relative to the log."""

    name: str
    logged: float
    planned: float
    unit: str  # "GiB", "tokens" or "x"

    @property
    def error(self) -> float | None:
        return (self.planned - self.logged) / self.logged if self.logged else None

    def to_dict(self) -> dict:
        err = self.error
        return {"name": self.name, "logged": self.logged, "planned": self.planned, "unit": self.unit,
                "error": round(err, 4) if err is not None else None}


def compare_with_plan(log: VLLMLog, plan) -> list[LogRow]:
    """Each figure the log gives beside the plan's (the tightest stage, vLLM's own KV figures)."""
    tight, rows = plan.tight, []

    def gib(value: int) -> float:
        return round(value / GIB, 2)

    terms = {t.name: t.bytes for t in tight.terms}
    if log.weights is not None:
        rows.append(LogRow("weights", gib(log.weights), gib(terms["weights"]), "GiB"))
    if log.activation is not None:
        rows.append(LogRow("activation peak (torch)", gib(log.activation), gib(terms["activation"]), "GiB"))
    if log.non_torch is not None:
        rows.append(LogRow("non-torch (comm + overhead)", gib(log.non_torch),
                           gib(terms["comm"] + terms["overhead"]), "GiB"))
    if log.kv is not None:
        rows.append(LogRow("KV cache", gib(log.kv), gib(tight.kv_bytes), "GiB"))
    vllm = plan.kv_cache.vllm
    if log.kv_tokens is not None and vllm is not None:
        rows.append(LogRow("GPU KV cache size", log.kv_tokens, vllm.tokens, "tokens"))
    if log.concurrency is not None and vllm is not None:
        rows.append(LogRow(f"max concurrency at {log.concurrency[0]:,} tokens", log.concurrency[1],
                           round(vllm.max_concurrency, 2), "x"))
    return rows


__all__ = ["VLLMLog", "LogRow", "parse_vllm_log", "read_vllm_log", "compare_with_plan"]
