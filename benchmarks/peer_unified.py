"""vLLM 0.33's Triton unified attention as a benchmark peer: loaded from ``.peers/``, called with kvpool's arguments.

The kernel files are fetched, never committed: from the repository root run
``python ../shared/peers/vllm_unified_attention.py fetch`` (into ``.peers/``, git-ignored) and copy the loader
beside them (``cp ../shared/peers/vllm_unified_attention.py .peers/``) so ``.peers/`` alone carries everything
to a GPU machine (``../shared`` does not travel). The loader is looked up in ``.peers/`` first, then in
``../shared/peers/``, as ``bench_decode.py`` does for vLLM's decode kernel. Every failure becomes a reason
string: a missing or broken peer must not stop kvpool's own figures.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADER = "vllm_unified_attention.py"
KERNEL = "vllm_triton_unified_attention.py"
_LOADED: dict = {}


def peers_dir(root: Path = ROOT) -> Path:
    """``$KVPOOL_PEERS_DIR`` or ``<repository root>/.peers``."""
    return Path(os.environ.get("KVPOOL_PEERS_DIR", root / ".peers"))


def load_unified_attention(root: Path = ROOT):
    """``(unified_attention, None)``, or ``(None, reason)`` when the peer is absent or fails to import."""
    peers = peers_dir(root)
    if peers in _LOADED:
        return _LOADED[peers]
    if not (peers / KERNEL).exists():
        result = (None, (f"vLLM unified attention skipped: {peers / KERNEL} is missing (from the repository root: "
                        f"python ../shared/peers/{LOADER} fetch)"))
    else:
        loader = next((p for p in (peers / LOADER, root.parent / "shared" / "peers" / LOADER) if p.exists()), None)
        if loader is None:
            result = (None, (f"vLLM unified attention skipped: no {LOADER} in {peers} or ../shared/peers "
                            f"(cp ../shared/peers/{LOADER} {peers}/ so it travels with the kernel files)"))
        else:
            try:
                spec = importlib.util.spec_from_file_location("vllm_unified_attention", loader)
                mod = importlib.util.module_from_spec(spec)
                sys.modules["vllm_unified_attention"] = mod
                spec.loader.exec_module(mod)
                result = (mod.load(peers), None)
            except Exception as e:  # noqa: BLE001 (a broken peer file: its reason goes into the results)
                result = (None, f"vLLM unified attention failed to load: {type(e).__name__}: {e}")
    _LOADED[peers] = result
    return result


def call_unified(fn, case, out, sliding_window=None, logit_soft_cap=None) -> None:
    """Run vLLM's ``unified_attention`` on a :class:`attention_cases.PagedCase`, writing ``out``.

    Its 2-D launch (one program per tile of queries x KV head), the path vLLM takes for batches with a
    prefill row: no split-K scratch is passed. kvpool's window ``W`` (the query's own token included) is
    vLLM's ``window_size=(W - 1, 0)``; a soft cap ``c`` is its ``softcap=c`` (0: none).
    """
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    fn(case.q, case.k_cache, case.v_cache, out, case.query_start_loc, case.max_q, case.seq_lens, case.max_k,
       case.scale, True, window, case.block_table, float(logit_soft_cap or 0.0), None, None, None)
