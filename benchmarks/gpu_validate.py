#!/usr/bin/env python
"""Validate the planner (issue 3) and start-up sizing (issue 5) against a real GPU, in one script.

On one GPU, in one process with a real 1-rank NCCL group:

1. build Llama-3.1-8B from its preset (``kvpool.load_model_spec`` -> ``transformers.LlamaConfig``) with
   random bf16 weights directly on the GPU (nothing downloaded);
2. ``kvpool.runtime.size_kv_pool(mem_fraction=0.9)`` with a real forward of ``--max-batched-tokens``
   tokens as ``profile_fn`` (plus the sampler's logits and probabilities for ``--max-seqs`` rows, as the
   planner models it);
3. allocate the ``PagedKVCache`` with that many blocks and run one ``paged_decode`` step on layer 0 at
   batch ``--decode-batch`` whose block tables cover the whole pool, checked against a float32
   reference on two sequences: the pool really fits;
4. print measured vs planned per term (weights, activation, non-torch, NCCL, KV, blocks) and write
   everything to ``${OUT:-benchmarks/out}/gpu_validate.json``.

Every stage is wrapped: a failing stage is reported and the script goes on, and the JSON is always
written. ``--dry-run`` runs the same stages on the CPU with a tiny model and declared memory (gloo
group, torch kernels), which is how the script is tested without a GPU.

Run (GPU machine, from the repository root)::

    PYTHONPATH=src python benchmarks/gpu_validate.py
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

GiB = 1024**3
MiB = 1024**2
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

# a Llama-shaped model small enough for the CPU (--dry-run)
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "_name_or_path": "tiny-llama",
}


# ----------------------------------------------------------------------------- stages
class Stages:
    """Runs named stages; a failure is recorded and printed, never raised."""

    def __init__(self):
        self.results: dict = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        rec = {"ok": False}
        self.results[name] = rec
        t0 = time.perf_counter()
        try:
            yield rec
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported, the next stages still run
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rec["traceback"] = traceback.format_exc(limit=8)[-4000:]
            print(f"[gpu_validate] stage {name!r} FAILED: {rec['error']}", flush=True)
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            print(f"[gpu_validate] stage {name!r}: {'ok' if rec['ok'] else 'failed'} in {rec['seconds']} s", flush=True)

    def ok(self, *names: str) -> bool:
        return all(self.results.get(n, {}).get("ok") for n in names)


def need(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"skipped: {what} did not succeed")


# ----------------------------------------------------------------------------- table
def comparison_rows(size: dict, extra: list | None = None) -> list[dict]:
    """Measured vs planned rows from ``PoolSize.to_dict()`` (+ ``extra`` rows), memory in GiB.

    Each row: ``term``, ``unit`` ("GiB" or "count"), ``measured``, ``planned`` (None when not planned),
    ``diff_pct`` (100 x (planned - measured) / measured, None when either is missing or measured is 0).
    """
    rows = []
    for r in size.get("comparison", []):
        count = r["term"] in ("blocks", "bytes per block")
        scale = 1 if count else GiB
        rows.append(_row(r["term"], "count" if count else "GiB", r["measured_bytes"] / scale,
                         None if r["predicted_bytes"] is None else r["predicted_bytes"] / scale))
    return rows + list(extra or [])


def _row(term: str, unit: str, measured, planned) -> dict:
    pct = None
    if measured not in (None, 0) and planned is not None:
        pct = 100.0 * (planned - measured) / measured
    return {"term": term, "unit": unit, "measured": measured, "planned": planned, "diff_pct": pct}


def format_table(rows: list[dict]) -> str:
    """Compact text table of ``comparison_rows``."""
    def fmt(v, unit):
        if v is None:
            return "-"
        return f"{v:,.0f}" if unit == "count" else f"{v:.3f}"

    out = [f"{'term':<28}{'unit':>6}{'measured':>14}{'planned':>14}{'plan vs meas':>14}"]
    for r in rows:
        pct = "-" if r["diff_pct"] is None else f"{r['diff_pct']:+.2f}%"
        out.append(f"{r['term']:<28}{r['unit']:>6}{fmt(r['measured'], r['unit']):>14}"
                   f"{fmt(r['planned'], r['unit']):>14}{pct:>14}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_config(spec):
    """A transformers ``LlamaConfig`` with the shape of ``spec`` (random weights; nothing downloaded)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings,
        attention_bias=spec.qkv_bias, mlp_bias=spec.mlp_bias, use_cache=False,
    )
    # FlashAttention-style prefill (no tokens x tokens scores), as the planner assumes
    cfg._attn_implementation = "sdpa"
    return cfg


def decode_reference(q, k_cache, v_cache, table_row, seq_len, scale):
    """float32 attention of one sequence over its pages: q ``[heads, d]``, pages ``[blocks, bs, kvh, d]``."""
    import torch

    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k = k_cache[table_row.long()].reshape(-1, kvh, d)[:seq_len].float()
    v = v_cache[table_row.long()].reshape(-1, kvh, d)[:seq_len].float()
    heads = q.shape[0]
    qq = q.float().view(kvh, heads // kvh, d)
    p = torch.softmax(torch.einsum("hgd,thd->hgt", qq, k) * scale, dim=-1)
    return torch.einsum("hgt,thd->hgd", p, v).reshape(heads, d)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", help="kvpool preset (a Llama-architecture model)")
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-seqs", type=int, default=256)
    p.add_argument("--mem-fraction", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-batch", type=int, default=256, help="decode batch spread over the whole pool")
    p.add_argument("--out", default=None, help="output folder (default $OUT or benchmarks/out)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, declared memory: test the script")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    st = Stages()
    report: dict = {
        "script": "benchmarks/gpu_validate.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "stages": st.results,
    }
    ctx: dict = {}

    with st.stage("setup") as rec:
        import torch
        import torch.distributed as dist
        import transformers

        import kvpool

        cuda = torch.cuda.is_available() and not args.dry_run
        need(cuda or args.dry_run, "CUDA (run with --dry-run to test on the CPU)")
        dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        # no device_id: the NCCL communicator must come up inside size_kv_pool, where it is measured
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=0, world_size=1)
        rec.update(torch=torch.__version__, transformers=transformers.__version__, kvpool=kvpool.__version__,
                   device=torch.cuda.get_device_name(dev) if cuda else "cpu (dry run)",
                   backend=dist.get_backend())
        report["card"] = rec["device"]
        ctx.update(torch=torch, dist=dist, dev=dev, cuda=cuda)

    with st.stage("model") as rec:
        need(st.ok("setup"), "setup")
        torch, dev = ctx["torch"], ctx["dev"]
        from transformers import LlamaForCausalLM

        spec = kvpool.load_model_spec(TINY_LLAMA if args.dry_run else args.model)
        config = llama_config(spec)
        before = torch.cuda.memory_allocated(dev) if ctx["cuda"] else 0
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy of 8B parameters
        try:
            with torch.device(dev):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
        model.eval()
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        rec.update(spec=spec.name, parameters=sum(p.numel() for p in model.parameters()),
                   param_bytes=param_bytes, buffer_bytes=buffer_bytes,
                   dtype=str(next(model.parameters()).dtype), attn=config._attn_implementation)
        if ctx["cuda"]:
            torch.cuda.synchronize(dev)
            rec["allocated_bytes"] = torch.cuda.memory_allocated(dev) - before
            free, total = torch.cuda.mem_get_info(dev)
            rec.update(free_after_load_bytes=free, total_bytes=total)
        ctx.update(spec=spec, model=model, param_bytes=param_bytes + buffer_bytes)

    with st.stage("size_kv_pool") as rec:
        need(st.ok("model"), "model")
        torch, dev, model, spec = ctx["torch"], ctx["dev"], ctx["model"], ctx["spec"]
        from kvpool.runtime import size_kv_pool

        tokens = args.max_batched_tokens if not args.dry_run else 256
        input_ids = torch.randint(0, spec.vocab_size, (1, tokens), device=dev)
        keep = min(args.max_seqs, tokens)

        def profile():
            # the server's largest step: a prefill of max_batched_tokens, then the sampler's logits
            # (model dtype -> float32 -> probabilities) for max_seqs rows, as the planner models it
            with torch.inference_mode():
                logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits
                probs = torch.softmax(logits[0].float(), dim=-1)
                return probs.shape

        kwargs = dict(block_size=args.block_size, mem_fraction=args.mem_fraction, profile_fn=profile,
                      max_batched_tokens=tokens, max_seqs=args.max_seqs)
        if args.dry_run:
            kwargs.update(device="cpu", device_memory_bytes=256 * MiB, in_use_bytes=ctx["param_bytes"],
                          activation_bytes=16 * MiB)
        t0 = time.perf_counter()
        size = size_kv_pool(spec, **kwargs)
        rec["call_seconds"] = round(time.perf_counter() - t0, 3)
        rec["profile_tokens"] = tokens
        rec["logits_to_keep"] = keep
        report["pool_size"] = size.to_dict()
        print(size.format_comparison(), flush=True)
        ctx["size"] = size
        if ctx["cuda"]:
            free, total = torch.cuda.mem_get_info(dev)
            rec["free_after_sizing_bytes"] = free

    with st.stage("allocate_pool") as rec:
        need(st.ok("size_kv_pool"), "size_kv_pool")
        torch, dev, size, spec = ctx["torch"], ctx["dev"], ctx["size"], ctx["spec"]
        from kvpool.cache import PagedKVCache

        before = torch.cuda.memory_allocated(dev) if ctx["cuda"] else 0
        cache = PagedKVCache.for_shard(spec, size.num_blocks, size.block_size, 0, 1, dev)
        rec.update(num_blocks=size.num_blocks, memory_bytes=cache.memory_bytes(),
                   expected_bytes=size.kv_bytes)
        need(cache.memory_bytes() == size.kv_bytes, "the pool's bytes == num_blocks x bytes_per_block")
        if ctx["cuda"]:
            torch.cuda.synchronize(dev)
            rec["allocated_bytes"] = torch.cuda.memory_allocated(dev) - before
            free, total = torch.cuda.mem_get_info(dev)
            rec.update(free_after_pool_bytes=free, total_bytes=total)
        ctx["cache"] = cache

    with st.stage("decode_step") as rec:
        need(st.ok("allocate_pool"), "allocate_pool")
        torch, dev, size, spec, cache = ctx["torch"], ctx["dev"], ctx["size"], ctx["spec"], ctx["cache"]
        from kvpool.kernels import paged_decode

        k_cache, v_cache, _, _ = cache.layer(0)
        k_cache.normal_()  # in place: the pool is uninitialized memory
        v_cache.normal_()
        batch = max(1, min(args.decode_batch, size.num_blocks))
        per_seq = size.num_blocks // batch
        # every block of the pool belongs to one sequence (the remainder, < batch blocks, stays unused)
        block_table = torch.arange(batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
        seq_lens = torch.full((batch,), per_seq * size.block_size, dtype=torch.int32, device=dev)
        # the last sequence one token short of full: a partly filled last page
        seq_lens[-1] -= 1
        q = torch.randn(batch, spec.num_attention_heads, spec.head_dim, dtype=k_cache.dtype, device=dev)
        scale = spec.head_dim ** -0.5
        if ctx["cuda"]:
            torch.cuda.reset_peak_memory_stats(dev)
        out = paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)  # includes the compile
        if ctx["cuda"]:
            torch.cuda.synchronize(dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)
            end.record()
            torch.cuda.synchronize(dev)
            rec["step_ms"] = round(start.elapsed_time(end), 3)
            rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            free, total = torch.cuda.mem_get_info(dev)
            rec["free_during_decode_bytes"] = free
        errs = []
        for i in (0, batch - 1):
            ref = decode_reference(q[i], k_cache, v_cache, block_table[i], int(seq_lens[i]), scale)
            errs.append(float((out[i].float() - ref).abs().max()))
        rec.update(batch=batch, blocks_per_seq=per_seq, tokens_per_seq=per_seq * size.block_size,
                   blocks_covered=batch * per_seq, pool_blocks=size.num_blocks,
                   max_abs_err_vs_fp32=max(errs), finite=bool(torch.isfinite(out).all()))
        need(rec["finite"] and max(errs) < 2e-2, "decode output matches the float32 reference")

    # ------------------------------------------------------------------ report
    rows = []
    with st.stage("report") as rec:
        size = report.get("pool_size")
        need(size is not None, "size_kv_pool")
        extra = []
        m = st.results.get("model", {})
        pred = size.get("predicted") or {}
        if "free_after_load_bytes" in m and pred:
            # what the plan says is free once weights and the CUDA context are in: total - weights - overhead
            planned_free = (size["total_bytes"] - pred["weights_bytes"] - pred["overhead_bytes"]) / GiB
            extra.append(_row("free after weights load", "GiB", m["free_after_load_bytes"] / GiB, planned_free))
        a = st.results.get("allocate_pool", {})
        if "memory_bytes" in a:
            extra.append(_row("pool allocated", "GiB", a["memory_bytes"] / GiB, pred.get("kv_bytes", 0) / GiB if pred else None))
        rows = comparison_rows(size, extra)
        kv = next((r for r in rows if r["term"] == "KV cache"), None)
        rec["kv_diff_pct"] = None if kv is None else kv["diff_pct"]
        rec["kv_within_3pct"] = kv is not None and kv["diff_pct"] is not None and abs(kv["diff_pct"]) <= 3.0
    report["table"] = rows
    report["seconds"] = round(time.perf_counter() - t_start, 2)

    try:
        if "dist" in ctx and ctx["dist"].is_initialized():
            ctx["dist"].destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        print(f"[gpu_validate] destroy_process_group failed: {exc}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_validate.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    failed = [n for n, r in st.results.items() if not r["ok"]]
    dec = st.results.get("decode_step", {})
    print(f"\n[gpu_validate] {report.get('card', '?')} | {report['seconds']} s | stages failed: {failed or 'none'} | "
          f"decode batch {dec.get('batch', '-')} x {dec.get('tokens_per_seq', '-')} tokens "
          f"in {dec.get('step_ms', '-')} ms, max err {dec.get('max_abs_err_vs_fp32', '-')} | "
          f"KV plan vs measured {st.results.get('report', {}).get('kv_diff_pct', '-')}% | JSON {path}")
    print(format_table(rows), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
