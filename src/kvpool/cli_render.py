"""Human output of the ``kvpool`` command (rich tables fitted to the terminal by ``cli_layout``); its charts
are in ``cli_plots``."""
from __future__ import annotations

from .cli_layout import Col, emit, fit_table, indented
from .plan.units import GIB


def _describe_model(spec) -> str:
    attn = "MHA" if spec.num_kv_heads == spec.num_attention_heads else ("MQA" if spec.num_kv_heads == 1 else "GQA")
    if spec.is_mla:
        attn = f"MLA (latent {spec.kv_lora_rank} + rope {spec.qk_rope_head_dim})"
    parts = [f"{spec.num_parameters / 1e9:.2f}B params", f"{spec.num_layers} layers",
             f"{spec.num_attention_heads} heads / {spec.num_kv_heads} KV heads ({attn})", f"head_dim {spec.head_dim}"]
    if spec.is_moe:
        parts.append(f"MoE {spec.num_experts} experts, top-{spec.num_experts_per_tok}")
    if spec.sliding_layers:
        windows = sorted({w for w in spec.layer_sliding_windows if w})
        parts.append(f"{spec.sliding_layers}/{spec.num_layers} layers sliding window {windows}")
    if spec.quant_method:
        parts.append(f"{spec.quant_method} {spec.weight_bits}-bit weights")
    return ", ".join(parts)


def _title(text: str) -> str:
    """A section title, after a blank line."""
    return f"\n[bold]{text}[/]"


def _gib(nbytes: float) -> str:
    """A table's GiB figure: two decimals, from the bytes."""
    return f"{nbytes / GIB:.2f}"


_TERM_LABELS = {"weights": "weights", "activation": "activation peak", "comm": "communication",
                "overhead": "kernels loaded lazily"}


def _memory_rows(plan) -> list[list[str]]:
    """The tightest stage's terms (the planner's own account of each), the KV rest, headroom and total."""
    rows = [[_TERM_LABELS[t.name], _gib(t.bytes), f"[yellow]given[/] (computed {_gib(t.computed)})" if t.given else t.how]
            for t in plan.tight.terms]
    rows += [
        ["[bold green]KV cache[/]", f"[bold green]{_gib(plan.tight.kv_bytes)}[/]", "what is left of the budget"],
        ["headroom (not used)", _gib(plan.headroom_bytes), "total − budget"],
    ]
    before = plan.before_snapshot
    if before is not None and before.bytes:
        where = ("inside the headroom (vLLM measures from its snapshot)" if plan.request.mem_fraction is not None
                 else "not in vLLM's budget arithmetic")
        rows.append(["  before vLLM's snapshot", _gib(before.bytes), f"{before.how}; {where}"])
    return rows + [["total", _gib(plan.total_bytes), ""]]


def _kv_rows(plan, spec) -> list[list[str]]:
    kv, lay = plan.kv_cache, plan.tight.layout
    scale = (f" + {lay.num_layers} × {lay.kv_heads} × {lay.tensors_per_layer} × {lay.scale_bytes} B fp32 scales"
             if lay.scale_bytes else "")
    v_part = f" + {lay.v_head_dim}" if lay.v_head_dim else ""
    if spec.is_mla:
        shape = (f"{lay.num_layers} layers × 1 latent (replicated on every rank) × ({spec.kv_lora_rank} + "
                 f"{spec.qk_rope_head_dim} rope)")
    else:
        shape = f"{lay.num_layers} layers × {lay.kv_heads} KV heads × ({lay.head_dim}{v_part})"
    rows = [
        ["bytes / token / GPU", f"{kv.bytes_per_token_per_gpu:,}", f"{shape} × {lay.dtype_bytes} B{scale}"],
        ["bytes / block / GPU", f"{kv.bytes_per_block_per_gpu:,}", f"block_size {kv.block_size}"],
        ["blocks", f"{kv.num_blocks:,}", f"{_gib(kv.kv_bytes_per_gpu)} GiB ÷ block bytes (rounded down)"],
        ["tokens", f"{kv.tokens:,}", f"blocks × {kv.block_size} ({kv.tokens_unpaged:,} without block rounding)"
         if kv.num_groups == 1 else f"blocks ÷ {kv.num_groups} KV-cache groups × {kv.block_size}: every group "
         f"keeping every token ({kv.tokens_unpaged:,} in one table of every layer)"],
        ["max concurrency", f"{kv.max_concurrency:,.2f}×", f"requests of max_model_len {kv.max_model_len:,} tokens"
         + ("" if kv.num_groups == 1 else ", every group keeping every token")],
    ]
    if lay.fp8_scales:
        rows.insert(1, ["fp8 scales", f"{lay.scale_bytes_per_token:,} B/token", lay.scale_layout()])
    if kv.window is not None:
        w = kv.window
        rows.append(["with window freeing", f"{w.max_concurrency:,.2f}×",
                     f"{w.num_blocks:,} blocks of {w.group_size} layer pages ÷ {w.blocks_per_request:,} per request "
                     f"in its {w.num_groups} KV-cache groups; {w.gain:,.2f}× the "
                     f"{w.max_concurrency_full:,.2f}× of one table of every layer"])
    return rows + _host_rows(kv) + _vllm_rows(kv)


def _host_rows(kv) -> list[list[str]]:
    """The host tier (``--host-kv-gib``): blocks, tokens and pinned bytes per GPU."""
    h = kv.host_tier
    if h is None:
        return []
    ratio = f", {h.tokens / kv.tokens:,.2f}× the GPU pool's" if kv.tokens else ""
    return [
        ["host tier blocks", f"{h.num_blocks:,}", f"{_gib(h.budget_bytes)} GiB pinned host memory per GPU ÷ block "
         f"bytes (same blocks as the GPU's)"],
        ["host tier tokens", f"{h.tokens:,}", f"{_gib(h.bytes)} GiB pinned per GPU"
         + (f", {_gib(h.bytes * h.gpus)} GiB on all {h.gpus} GPUs" if h.gpus > 1 else "") + ratio],
    ]


def _vllm_rows(kv) -> list[list[str]]:
    """The figures vLLM's start-up log prints for the same KV bytes (its groups, padding, tokens)."""
    v = kv.vllm
    if v is None:
        return []
    groups = " + ".join(f"{n} × {'full' if w is None else f'sliding {w:,}'}" for w, n in v.groups)
    how = f"{v.num_groups} KV-cache group(s) of {v.group_size} layers ({groups})"
    if v.padding_layers:
        how += f", {v.padding_layers} padding layers"
    return [
        ["vLLM: GPU KV cache size", f"{v.tokens:,} tokens", f"{v.num_blocks:,} blocks ÷ {v.num_groups} groups × "
         f"{kv.block_size}; {how}"],
        ["vLLM: max concurrency", f"{v.max_concurrency:,.2f}×",
         f"{v.num_blocks:,} blocks ÷ {v.blocks_per_request:,} per request of {kv.max_model_len:,} tokens"],
    ]


def _workload(plan) -> list:
    w, kv = plan.workload, plan.kv_cache
    f = w.fit
    verdict = "[bold green]fits[/]" if f.fits else "[bold red]does not fit[/]"
    items = [_title("Workload") + f" batch {f.batch} × {f.seq_len:,} tokens: {verdict} — needs "
             f"{f.blocks_needed:,} blocks ({_gib(w.kv_needed_bytes)} GiB/GPU) of {kv.num_blocks:,}; "
             f"largest batch at this length {f.max_batch:,}; longest length at this batch "
             f"{f.max_seq_len:,}" + (f" ({w.tokens_unpaged // f.batch:,} without block rounding)"
                                     if f.group_windows == (None,) else " (windowed groups holding their window)")]
    return items + [indented(r, bullet="•") for r in w.recommendations()]


def _stages(plan) -> list:
    cols = [Col(c) for c in ("stage", "layers", "weights", "activation", "KV GiB", "blocks")]
    rows = [[str(s.index), f"{s.layers.start}–{s.layers.stop - 1}", _gib(s.term("weights").bytes),
             _gib(s.term("activation").bytes), _gib(s.kv_bytes), f"{s.num_blocks:,}"] for s in plan.per_stage]
    return [_title("Pipeline stages (the tightest decides the block count)"), *fit_table(cols, rows)]


def render_plan(plan, plot=None) -> None:
    """The plan as tables: per-GPU memory (each term with how it was computed), the KV pool, the workload."""
    req = plan.request
    spec = req.spec
    emit(f"[bold]kvpool plan[/] · {plan.model} on {req.tp * req.pp} × {plan.gpu} "
         f"(tp={req.tp}, pp={req.pp}, {req.link.name})",
         indented(f"{_describe_model(spec)}; serving dtype {req.serving_dtype}, KV {plan.kv_cache.kv_dtype}"),
         *([indented(f"model: {spec.source}")] if spec.source else []))
    total, budget = _gib(plan.total_bytes), _gib(plan.budget_bytes)
    if req.mem_fraction is not None:
        budget = f"{req.mem_fraction:g} × {total} GiB = {budget} GiB (vLLM gpu_memory_utilization)"
    else:
        budget = f"{total} GiB − headroom {_gib(plan.headroom_bytes)} GiB = {budget} GiB (explicit reservations)"
    stage_note = f", tightest stage {plan.tightest}" if req.pp > 1 else ""
    emit(_title(f"Per-GPU memory{stage_note}") + f" — budget {budget}",
         *fit_table([Col("term", "text"), Col("GiB"), Col("how it is computed", "text")], _memory_rows(plan)))
    emit(_title("KV cache") + " (per replica: every TP rank holds the same blocks, its own heads)",
         *fit_table([Col("", "key"), Col(""), Col("", "text")], _kv_rows(plan, spec), show_header=False))
    if plan.workload is not None:
        emit(*_workload(plan))
    if req.pp > 1:
        emit(*_stages(plan))
    warnings = plan.warnings
    if warnings:
        emit("", *(indented(w, indent=0, bullet="[yellow]note:[/]") for w in warnings))
    if plot:
        emit(f"chart written to {plot}")


_SCALE_COLS = [Col("TP"), Col("GPUs"), Col("weights GiB/GPU"), Col("KV GiB/GPU"), Col("KV tokens"), Col("batch"),
               Col("decode tok/s"), Col("token latency ms"), Col("prefill ms"), Col("comm share"), Col("speedup"),
               Col("efficiency")]


def _scale_row(r: dict) -> list[str]:
    if not r.get("fits"):
        return [str(r["tp"]), str(r["gpus"]), "[red]does not fit[/]", *(["—"] * 9)]  # the summary says why
    return [str(r["tp"]), str(r["gpus"]), f"{r['weights_gib']:.1f}", f"{r['kv_cache_gib']:.1f}",
            f"{r['kv_tokens']:,}", f"{r['batch']:,}", f"{r['decode_tokens_per_s']:,.0f}",
            f"{r['token_latency_ms']:.2f}", f"{r['prefill_ms']:,.0f}", f"{100 * r['comm_share']:.1f}%",
            f"{r['speedup']:.2f}×", f"{r['efficiency']:.2f}"]


def render_scale(result, plot=None) -> None:
    rows = [_scale_row(r) for r in result["rows"]]
    cols = _SCALE_COLS
    if all(r["gpus"] == r["tp"] for r in result["rows"]):  # no pipeline stages: the GPUs column repeats TP
        cols, rows = cols[:1] + cols[2:], [r[:1] + r[2:] for r in rows]
    emit(f"[bold]kvpool scale[/] · {result['model']} on {result['gpu']} over {result['interconnect']}, "
         f"sequences of {result['seq_len']:,} tokens (roofline: peak rates)", *fit_table(cols, rows))
    emit("", *(indented(line, bullet="•") for line in result["summary"]))
    if result["by_seq_len"]:
        keys = [k for k in result["by_seq_len"][0] if k.endswith("tokens_per_s")]
        cols = [Col("seq_len"), *(Col(k.replace("_tokens_per_s", " tok/s")) for k in keys), Col("speedup")]
        rows = [[f"{r['seq_len']:,}", *(f"{r[k]:,.0f}" for k in keys),
                 "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"] for r in result["by_seq_len"]]
        emit(_title("Where TP pays most") + ": throughput speedup of the largest TP over the smallest, by length",
             *fit_table(cols, rows))
    if plot:
        emit(f"chart written to {plot}")


def render_comm(rep) -> None:
    m = rep["memory"]
    emit(f"[bold]kvpool comm[/] · {rep['model']} on {rep['tp']} × {rep['gpu']}: {rep['allreduces_per_forward']} "
         f"all-reduces per forward pass (2 per layer + embedding)",
         indented(f"bytes per all-reduce: decode batch {rep['batch']} → {rep['bytes_per_allreduce_decode']:,} B; "
                  f"prefill step → {rep['bytes_per_allreduce_prefill']:,} B"),
         indented(f"memory per GPU after vLLM's snapshot: torch's NCCL comm {m['nccl_channels']} channels → set-up "
                  f"{m['nccl_setup_bytes'] / (1 << 20):,.0f} MiB + ring {m['nccl_protocol_buffers_bytes'] / (1 << 20):,.0f}"
                  f" MiB, NVLS {m['nccl_nvls_bytes'] / (1 << 20):,.0f} MiB, FlashInfer AR-fusion workspace "
                  f"{m['flashinfer_workspace_bytes'] / (1 << 20):,.0f} MiB"
                  + (f", staging {m['staging_bytes'] / (1 << 20):,.1f} MiB" if m["staging_bytes"] else "")
                  + f" = {m['comm_gib']:.3f} GiB; before it (headroom) {m['before_snapshot_bytes'] / (1 << 30):.2f} GiB"))
    cols = [Col("link", "text"), Col("GB/s/dir"), Col("all-reduce decode µs"), Col("all-reduce prefill µs"),
            Col("comm/step ms"), Col("step ms"), Col("comm share"), Col("decode tok/s"), Col("vs first")]
    rows = [[r["name"], f"{r['gbps']:g}", f"{r['allreduce_decode_us']:.1f}", f"{r['allreduce_prefill_us']:,.0f}",
             f"{r['comm_per_decode_step_ms']:.2f}", f"{r['decode_step_ms']:.2f}", f"{100 * r['comm_share']:.1f}%",
             f"{r['decode_tokens_per_s']:,.0f}", f"{r['ratio_vs_first']:.2f}×"] for r in rep["rows"]]
    if rep["batch"] < rep["batch_requested"]:
        emit(indented(f"[yellow]note:[/] decode batch {rep['batch_requested']:,} capped at {rep['batch']:,}, the "
                      f"sequences of {rep['seq_len']:,} tokens the KV pool holds"))
    emit(_title("Per interconnect") + f" (decode batch {rep['batch']} at {rep['seq_len']:,} tokens)",
         *fit_table(cols, rows))


def render_diagnose(snaps, findings) -> None:
    f = lambda v: "—" if v is None else f"{v / GIB:.2f}"  # noqa: E731
    cols = [Col(c) for c in ("rank", "used GiB", "total GiB", "allocated", "reserved", "peak")]
    rows = [[str(s.rank), f(s.used), f(s.total), f(s.allocated), f(s.reserved), f(s.peak)] for s in snaps]
    emit(_title("GPU memory snapshots"), *fit_table(cols, rows))
    colour = {"error": "red", "warning": "yellow", "ok": "green"}
    for x in findings:
        emit(f"[{colour[x.severity]}]{x.severity}[/]: [bold]{x.title}[/]",
             indented(x.evidence, bullet="figures:"), indented(x.fix, bullet="fix:"))


def model_rows() -> list[dict]:
    from .plan.dtypes import serving_dtype
    from .plan.kv import kv_shard_layout
    from .plan.model import list_presets, load_model_spec

    rows = []
    for name in list_presets():
        spec = load_model_spec(name)
        kv_dtype = serving_dtype(spec, None)
        rows.append({
            "name": name, "source": spec.checkpoint, "params_b": round(spec.num_parameters / 1e9, 2),
            "layers": spec.num_layers, "hidden": spec.hidden_size, "heads": spec.num_attention_heads,
            "kv_heads": 1 if spec.is_mla else spec.num_kv_heads, "head_dim": spec.head_dim,
            "kv_bytes_per_token": kv_shard_layout(spec, 1, kv_dtype).bytes_per_token, "kv_dtype": kv_dtype,
            "max_len": spec.max_position_embeddings,
            "notes": ", ".join(filter(None, [
                f"MoE {spec.num_experts}x top-{spec.num_experts_per_tok}" if spec.is_moe else "",
                "MLA" if spec.is_mla else "",
                f"sliding {spec.sliding_layers}/{spec.num_layers}" if spec.sliding_layers else "",
                f"{spec.quant_method} weights" if spec.quant_method else "",
            ])),
        })
    return rows


def render_models(rows) -> None:
    cols = [Col("preset", "key"), Col("params"), Col("layers"), Col("heads/KV"), Col("head_dim"), Col("KV B/token"),
            Col("max len"), Col("checkpoint", "key"), Col("notes", "text")]
    cells = [[r["name"], f"{r['params_b']:,.2f}B", str(r["layers"]), f"{r['heads']}/{r['kv_heads']}", str(r["head_dim"]),
              f"{r['kv_bytes_per_token']:,}", f"{r['max_len']:,}", r["source"], r["notes"]] for r in rows]
    emit(_title("Model presets") + " (config.json files; KV bytes/token at tp=1 in the serving dtype)",
         *fit_table(cols, cells))


def render_gpus() -> None:
    from .plan.hardware import GPUS, INTERCONNECTS

    cols = [Col("preset", "key"), Col("name", "key"), Col("memory GiB"), Col("HBM GB/s"), Col("bf16 TFLOPS"),
            Col("fp8 TFLOPS"), Col("link", "key")]
    rows = [[k, g.name, f"{g.memory_mib / 1024:.2f}", f"{g.hbm_gbps:,.0f}", f"{g.bf16_tflops:,.1f}",
             f"{g.fp8_tflops:,.1f}" if g.fp8_tflops else "—", g.interconnect] for k, g in GPUS.items()]
    emit(_title("GPU presets") + " (memory as nvidia-smi reports it; dense bf16 rate)", *fit_table(cols, rows))
    cols = [Col("preset", "key"), Col("name", "text"), Col("GB/s per direction"), Col("hop µs"), Col("base µs"),
            Col("cross-node", "key")]
    rows = [[k, v.name, f"{v.gbps:g}", f"{v.hop_latency_us:g}", f"{v.base_latency_us:g}", "yes" if v.cross_node else "no"]
            for k, v in INTERCONNECTS.items()]
    emit(_title("Interconnect presets"), *fit_table(cols, rows))

