"""Human output of the ``kvpool`` command (rich tables) and its charts (matplotlib, imported lazily)."""
from __future__ import annotations

import shutil

from rich import box
from rich.console import Console
from rich.table import Table

GIB = 1 << 30
# a pipe or a narrow terminal would fold the tables into unreadable columns: draw at least 132 wide
_console = Console(highlight=False, soft_wrap=False, width=max(132, shutil.get_terminal_size((132, 40)).columns))


def _out(*items) -> None:
    for item in items:
        _console.print(item)


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


def render_plan(plan, spec, plot=None) -> None:
    d = plan.to_dict()
    par, g, kv, det = d["parallel"], d["per_gpu"], d["kv_cache"], d["details"]
    _out(f"[bold]kvpool plan[/] · {plan.model} on {par['gpus']} × {plan.gpu} "
         f"(tp={par['tp']}, pp={par['pp']}, {par['interconnect']})")
    _out(f"  {_describe_model(spec)}; serving dtype {det['dtype']}, KV {kv['kv_dtype']}")
    if spec.source:
        _out(f"  model: {spec.source}")
    if g["budget_mode"] == "mem_fraction":
        budget = f"{g['mem_fraction']:g} × {g['total_gib']:.2f} GiB = {g['budget_gib']:.2f} GiB (vLLM gpu_memory_utilization)"
    else:
        budget = f"{g['total_gib']:.2f} GiB − headroom {g['headroom_gib']:.2f} GiB = {g['budget_gib']:.2f} GiB (explicit reservations)"
    stage_note = f", tightest stage {par['tightest_stage']}" if par["pp"] > 1 else ""
    t = Table(title=f"Per-GPU memory{stage_note} — budget {budget}", box=box.SIMPLE_HEAVY, title_justify="left")
    t.add_column("term")
    t.add_column("GiB", justify="right")
    t.add_column("how it is computed")
    over = set(det["overridden"])
    a, c, o = det["activation_bytes"], det["comm_bytes"], det["overhead_bytes"]
    tag = lambda key, text: f"[yellow]given[/] (computed {det['computed_gib'][key]:.2f})" if f"{key}_gib" in over else text
    t.add_row("weights", f"{g['weights_gib']:.2f}", tag("weights",
              f"1/{par['tp']} of {det['weights_total_gib']:.2f} GiB ("
              + (f"{spec.quant_method} {spec.weight_bits}-bit linear layers, {det['dtype']} rest" if spec.quant_method
                 else det["dtype"]) + ") + replicated norms"
              + (", router" if spec.is_moe else "") + (", KV heads" if spec.num_kv_heads < par["tp"] and not spec.is_mla else "")
              + (f", layers {d['stages'][par['tightest_stage']]['layers'][0]}–{d['stages'][par['tightest_stage']]['layers'][1] - 1}" if par["pp"] > 1 else "")))
    t.add_row("activation peak", f"{g['activation_gib']:.2f}", tag("activation",
              f"max(prefill of {det['max_batched_tokens']:,} tokens {a['forward_peak'] / GIB:.2f}, "
              f"sampler for {det['max_seqs']} seqs × {spec.vocab_size:,} vocab {a['sampler'] / GIB:.2f} + hidden)"))
    nccl = c["nccl_tp"]
    comm_text = (f"NCCL {nccl['channels']} channels × 2 peers × (LL+LL128+Simple) = {nccl['protocol_buffers'] / GIB:.2f}"
                 + (f", NVLS {nccl['nvls'] / GIB:.2f}" if nccl["nvls"] else "")
                 + f", staging {c['staging'] / GIB:.3f}") if par["tp"] > 1 else "no TP all-reduce (one GPU per stage)"
    if c["nccl_pp"]:
        comm_text += f", pipeline send/recv {c['nccl_pp'] / GIB:.2f}"
    t.add_row("communication", f"{g['comm_gib']:.2f}", tag("comm", comm_text))
    t.add_row("CUDA context, workspaces, graphs", f"{g['overhead_gib']:.2f}", tag("overhead",
              f"context {o['cuda_context'] / GIB:.2f} + cuBLAS {o['cublas_workspace'] / GIB:.2f} + graph pool "
              f"{o['cuda_graphs'] / GIB:.2f}"))
    t.add_row("[bold green]KV cache[/]", f"[bold green]{g['kv_cache_gib']:.2f}[/]", "what is left of the budget")
    t.add_row("headroom (not used)", f"{g['headroom_gib']:.2f}", "total − budget")
    t.add_row("total", f"{g['total_gib']:.2f}", "")
    _out(t)
    lay = det["layout"]
    tensors = 2 if lay["v_head_dim"] else 1
    scale = (f" + {lay['num_layers']} × {lay['kv_heads']} × {tensors} × {lay['scale_bytes']} B fp32 scales"
             if lay["scale_bytes"] else "")
    kv_t = Table(title="KV cache (per replica: every TP rank holds the same blocks, its own heads)",
                 box=box.SIMPLE_HEAVY, title_justify="left", show_header=False)
    kv_t.add_column(justify="left")
    kv_t.add_column(justify="right")
    kv_t.add_column()
    v_part = f" + {lay['v_head_dim']}" if lay["v_head_dim"] else ""
    if spec.is_mla:
        shape = (f"{lay['num_layers']} layers × 1 latent (replicated on every rank) × ({spec.kv_lora_rank} + "
                 f"{spec.qk_rope_head_dim} rope)")
    else:
        shape = f"{lay['num_layers']} layers × {lay['kv_heads']} KV heads × ({lay['head_dim']}{v_part})"
    kv_t.add_row("bytes / token / GPU", f"{kv['bytes_per_token_per_gpu']:,}", f"{shape} × {lay['dtype_bytes']} B{scale}")
    if lay.get("fp8_scales"):
        kv_t.add_row("fp8 scales", f"{lay['scale_bytes_per_token']:,} B/token", lay["scale_layout"])
    kv_t.add_row("bytes / block / GPU", f"{kv['bytes_per_block_per_gpu']:,}", f"block_size {kv['block_size']}")
    kv_t.add_row("blocks", f"{kv['num_blocks']:,}", f"{g['kv_cache_gib']:.2f} GiB ÷ block bytes (rounded down)")
    kv_t.add_row("tokens", f"{kv['tokens']:,}", f"blocks × {kv['block_size']} ({kv['tokens_unpaged']:,} without block rounding)")
    kv_t.add_row("max concurrency", f"{kv['max_concurrency']:,.2f}×", f"requests of max_model_len {kv['max_model_len']:,} tokens")
    if kv["sliding_window_layers"]:
        kv_t.add_row("window-aware concurrency", f"{kv['max_concurrency_window_aware']:,.2f}×",
                     "if sliding-window layers kept only their window (per-layer-type pool; not kvpool's single pool)")
    _out(kv_t)
    if plan.workload:
        w = plan.workload
        verdict = "[bold green]fits[/]" if w["fits"] else "[bold red]does not fit[/]"
        _out(f"[bold]Workload[/] batch {w['batch']} × {w['seq_len']:,} tokens: {verdict} — needs "
             f"{w['blocks_needed']:,} blocks ({w['kv_needed_gib_per_gpu']:.2f} GiB/GPU) of {kv['num_blocks']:,}; "
             f"largest batch at this length {w['max_batch_at_seq_len']:,}; longest length at this batch "
             f"{w['max_seq_len_at_batch']:,} ({w['tokens_per_request_unpaged']:,} without block rounding)")
        for r in w["recommendations"]:
            _out(f"  • {r}")
    if par["pp"] > 1:
        st = Table(title="Pipeline stages (the tightest decides the block count)", box=box.SIMPLE, title_justify="left")
        for col in ("stage", "layers", "weights", "activation", "KV GiB", "blocks"):
            st.add_column(col, justify="right")
        for s in d["stages"]:
            st.add_row(str(s["stage"]), f"{s['layers'][0]}–{s['layers'][1] - 1}", f"{s['weights_gib']:.2f}",
                       f"{s['activation_gib']:.2f}", f"{s['kv_cache_gib']:.2f}", f"{s['num_blocks']:,}")
        _out(st)
    for w in d["warnings"]:
        _out(f"[yellow]note:[/] {w}")
    if plot:
        _out(f"chart written to {plot}")


def render_scale(result, plot=None) -> None:
    t = Table(title=f"kvpool scale · {result['model']} on {result['gpu']} over {result['interconnect']}, "
                    f"sequences of {result['seq_len']:,} tokens (roofline: peak rates)",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("TP", "GPUs", "weights GiB/GPU", "KV GiB/GPU", "KV tokens", "batch", "decode tok/s", "token latency ms",
                "prefill ms", "comm share", "speedup", "efficiency"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        if not r.get("fits"):
            t.add_row(str(r["tp"]), str(r["gpus"]), *(["—"] * 9), "[red]does not fit[/]")
            continue
        t.add_row(str(r["tp"]), str(r["gpus"]), f"{r['weights_gib']:.1f}", f"{r['kv_cache_gib']:.1f}",
                  f"{r['kv_tokens']:,}", f"{r['batch']:,}", f"{r['decode_tokens_per_s']:,.0f}",
                  f"{r['token_latency_ms']:.2f}", f"{r['prefill_ms']:,.0f}", f"{100 * r['comm_share']:.1f}%",
                  f"{r['speedup']:.2f}×", f"{r['efficiency']:.2f}")
    _out(t)
    for line in result["summary"]:
        _out(f"  • {line}")
    if result["by_seq_len"]:
        s = Table(title="Where TP pays most: throughput speedup of the largest TP over the smallest, by length",
                  box=box.SIMPLE, title_justify="left")
        keys = [k for k in result["by_seq_len"][0] if k.endswith("tokens_per_s")]
        s.add_column("seq_len", justify="right")
        for k in keys:
            s.add_column(k.replace("_tokens_per_s", " tok/s"), justify="right")
        s.add_column("speedup", justify="right")
        for r in result["by_seq_len"]:
            speed = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"
            s.add_row(f"{r['seq_len']:,}", *(f"{r[k]:,.0f}" for k in keys), speed)
        _out(s)
    if plot:
        _out(f"chart written to {plot}")


def render_comm(rep) -> None:
    m = rep["memory"]
    _out(f"[bold]kvpool comm[/] · {rep['model']} on {rep['tp']} × {rep['gpu']}: {rep['allreduces_per_forward']} "
         f"all-reduces per forward pass (2 per layer + embedding)")
    _out(f"  bytes per all-reduce: decode batch {rep['batch']} → {rep['bytes_per_allreduce_decode']:,} B; "
         f"prefill step → {rep['bytes_per_allreduce_prefill']:,} B")
    _out(f"  NCCL memory per GPU: {m['nccl_channels']} channels → protocol buffers "
         f"{m['nccl_protocol_buffers_bytes'] / (1 << 20):,.1f} MiB, NVLS {m['nccl_nvls_bytes'] / (1 << 20):,.1f} MiB, "
         f"staging {m['staging_bytes'] / (1 << 20):,.1f} MiB"
         + (f", pipeline {m['nccl_pp_bytes'] / (1 << 20):,.1f} MiB" if m["nccl_pp_bytes"] else "")
         + f" = {m['comm_gib']:.3f} GiB")
    t = Table(title=f"Per interconnect (decode batch {rep['batch']} at {rep['seq_len']:,} tokens)",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("link", "GB/s/dir", "all-reduce decode µs", "all-reduce prefill µs", "comm/step ms", "step ms",
                "comm share", "decode tok/s", "vs first"):
        t.add_column(col, justify="right")
    for r in rep["rows"]:
        t.add_row(r["name"], f"{r['gbps']:g}", f"{r['allreduce_decode_us']:.1f}", f"{r['allreduce_prefill_us']:,.0f}",
                  f"{r['comm_per_decode_step_ms']:.2f}", f"{r['decode_step_ms']:.2f}", f"{100 * r['comm_share']:.1f}%",
                  f"{r['decode_tokens_per_s']:,.0f}", f"{r['ratio_vs_first']:.2f}×")
    _out(t)


def render_diagnose(snaps, findings) -> None:
    t = Table(title="GPU memory snapshots", box=box.SIMPLE, title_justify="left")
    for col in ("rank", "used GiB", "total GiB", "allocated", "reserved", "peak"):
        t.add_column(col, justify="right")
    f = lambda v: "—" if v is None else f"{v / GIB:.2f}"
    for s in snaps:
        t.add_row(str(s.rank), f(s.used), f(s.total), f(s.allocated), f(s.reserved), f(s.peak))
    _out(t)
    colour = {"error": "red", "warning": "yellow", "ok": "green"}
    for x in findings:
        _out(f"[{colour[x.severity]}]{x.severity}[/]: [bold]{x.title}[/]\n  figures: {x.evidence}\n  fix: {x.fix}")


def model_rows() -> list[dict]:
    from .plan.kv import kv_shard_layout
    from .plan.memory import serving_dtype
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
    t = Table(title="Model presets (config.json files; KV bytes/token at tp=1 in the serving dtype)",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col, j in (("preset", "left"), ("checkpoint", "left"), ("params", "right"), ("layers", "right"),
                   ("heads/KV", "right"), ("head_dim", "right"), ("KV B/token", "right"), ("max len", "right"),
                   ("notes", "left")):
        t.add_column(col, justify=j)
    for r in rows:
        t.add_row(r["name"], r["source"], f"{r['params_b']:,.2f}B", str(r["layers"]), f"{r['heads']}/{r['kv_heads']}",
                  str(r["head_dim"]), f"{r['kv_bytes_per_token']:,}", f"{r['max_len']:,}", r["notes"])
    _out(t)


def render_gpus() -> None:
    from .plan.hardware import GPUS, INTERCONNECTS

    t = Table(title="GPU presets (memory as nvidia-smi reports it; dense bf16 rate)", box=box.SIMPLE_HEAVY,
              title_justify="left")
    for col, j in (("preset", "left"), ("name", "left"), ("memory GiB", "right"), ("HBM GB/s", "right"),
                   ("bf16 TFLOPS", "right"), ("fp8 TFLOPS", "right"), ("link", "left")):
        t.add_column(col, justify=j)
    for k, g in GPUS.items():
        t.add_row(k, g.name, f"{g.memory_mib / 1024:.2f}", f"{g.hbm_gbps:,.0f}", f"{g.bf16_tflops:,.1f}",
                  f"{g.fp8_tflops:,.1f}" if g.fp8_tflops else "—", g.interconnect)
    _out(t)
    i = Table(title="Interconnect presets", box=box.SIMPLE_HEAVY, title_justify="left")
    for col, j in (("preset", "left"), ("name", "left"), ("GB/s per direction", "right"), ("hop µs", "right"),
                   ("base µs", "right"), ("cross-node", "left")):
        i.add_column(col, justify=j)
    for k, v in INTERCONNECTS.items():
        i.add_row(k, v.name, f"{v.gbps:g}", f"{v.hop_latency_us:g}", f"{v.base_latency_us:g}", "yes" if v.cross_node else "no")
    _out(i)


# ------------------------------------------------------------------------------ charts
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    from .errors import InvalidArgumentError

    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot write the chart to {path!r}: {exc}") from None


def plot_plan(plan, path) -> None:
    """Stacked bars: one per GPU of the deployment (all TP ranks of each PP stage)."""
    plt = _pyplot()
    d = plan.to_dict()
    stages = d["stages"]
    total = d["per_gpu"]["total_gib"]
    budget = d["per_gpu"]["budget_gib"]
    tp = d["parallel"]["tp"]
    labels, bars = [], []
    for s in stages:
        for r in range(tp):
            labels.append(f"s{s['stage']}/r{r}" if len(stages) > 1 else f"GPU {r}")
            bars.append([s["weights_gib"], s["activation_gib"], s["comm_gib"], s["overhead_gib"],
                         max(0.0, s["kv_cache_gib"]), total - budget])
    names = ["weights", "activation", "communication", "context/graphs", "KV cache", "headroom"]
    colours = ["#4c72b0", "#dd8452", "#c44e52", "#8172b3", "#55a868", "#cccccc"]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 3), 4.5))
    bottom = [0.0] * len(labels)
    for i, (name, colour) in enumerate(zip(names, colours)):
        vals = [b[i] for b in bars]
        ax.bar(labels, vals, bottom=bottom, label=name, color=colour)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.axhline(total, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylabel("GiB")
    ax.set_title(f"{d['model']} · {d['parallel']['gpus']} × {d['gpu']}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, path)
    plt.close(fig)


def plot_scale(result, path) -> None:
    plt = _pyplot()
    ok = [r for r in result["rows"] if r.get("fits")]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if ok:
        ax.plot([r["tp"] for r in ok], [r["decode_tokens_per_s"] for r in ok], "o-", label="decode tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["tp"] for r in ok], [str(r["tp"]) for r in ok])
        ax2 = ax.twinx()
        ax2.plot([r["tp"] for r in ok], [r["efficiency"] for r in ok], "s--", color="#c44e52", label="efficiency")
        ax2.set_ylabel("efficiency (speedup / GPUs)")
        ax2.set_ylim(0, 1.1)
        ax2.legend(loc="lower right")
    ax.set_xlabel("tensor parallel degree")
    ax.set_ylabel("decode tokens/s (roofline)")
    ax.set_title(f"{result['model']} on {result['gpu']}, {result['seq_len']:,}-token sequences")
    ax.legend(loc="upper left")
    _save(fig, path)
    plt.close(fig)
