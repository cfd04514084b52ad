"""Charts of the ``kvpool`` command (``--plot FILE.png``), drawn with matplotlib (imported lazily).

Every number a chart shows is the one the command's table prints, formatted the same way, so the chart
and the table can be compared by eye (and are, in ``tests/test_cli_plots.py``).
"""
from __future__ import annotations

from .errors import InvalidArgumentError
from .plan.units import GIB, gib

# (per-GPU term, legend label, colour), bottom to top of a bar; the keys of MemoryPlan.to_dict()'s per_gpu
PLAN_TERMS = (("weights_gib", "weights", "#4c72b0"), ("activation_gib", "activation peak", "#dd8452"),
              ("comm_gib", "communication", "#c44e52"), ("overhead_gib", "kernels loaded lazily", "#8172b3"),
              ("kv_cache_gib", "KV cache", "#55a868"), ("headroom_gib", "headroom (not used)", "#cccccc"))
SMALL_TERMS = ("activation_gib", "comm_gib", "overhead_gib")  # under a GiB: slivers on a bar, so a panel of their own


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot write the chart to {path!r}: {exc}") from None


def stage_bytes(plan, stage) -> dict:
    """``{term: bytes}`` of one GPU of ``stage``, keyed as PLAN_TERMS (``weights_gib``, ...)."""
    terms = {f"{t.name}_gib": t.bytes for t in stage.terms}
    return dict(terms, kv_cache_gib=max(0, stage.kv_bytes), headroom_gib=plan.headroom_bytes)


def _label(nbytes: int) -> str:
    """A figure as the table prints it: GiB with two decimals."""
    return f"{nbytes / GIB:.2f}"


def plan_bars(plan) -> tuple[list[str], list[dict]]:
    """One bar per GPU of ``plan`` (a MemoryPlan): labels and ``{term: bytes}``.

    Every TP rank of a pipeline stage holds the same bytes; pp=1 bars are the table's per-GPU column.
    """
    stages, tp = plan.per_stage, plan.request.tp
    labels, bars = [], []
    for s in stages:
        terms = stage_bytes(plan, s)
        for r in range(tp):
            labels.append(f"stage {s.index}\nGPU {s.index * tp + r}" if len(stages) > 1 else f"GPU {r}")
            bars.append(terms)
    return labels, bars


def _stacked_bars(ax, labels: list[str], bars: list[dict], total_bytes: int) -> None:
    """The stacked bars (heights: the JSON's GiB), each big term labelled with the table's figure."""
    total_gib = gib(total_bytes)
    bottom = [0.0] * len(bars)
    for key, name, colour in PLAN_TERMS:
        values = [gib(b[key]) for b in bars]
        ax.bar(labels, values, bottom=bottom, label=name, color=colour, width=0.7)
        if key not in SMALL_TERMS:
            for x, (v, b, bar) in enumerate(zip(values, bottom, bars)):
                if v >= 0.06 * total_gib:  # tall enough for a label inside
                    ax.text(x, b + v / 2, _label(bar[key]), ha="center", va="center", fontsize=8,
                            color="black" if key == "headroom_gib" else "white")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(total_gib, color="black", linewidth=0.8, linestyle="--")
    ax.text(len(bars) - 0.5, total_gib, f"total {_label(total_bytes)}", ha="right", va="bottom", fontsize=8)
    ax.set_ylim(0, total_gib * 1.08)
    ax.set_ylabel("GiB per GPU")


def _small_terms_panel(ax, plan) -> None:
    """The sub-GiB terms of the tightest stage as horizontal bars on their own scale."""
    stage = stage_bytes(plan, plan.tight)
    rows = [(name, colour, stage[key]) for key, name, colour in PLAN_TERMS if key in SMALL_TERMS]
    names = [r[0].replace(", ", ",\n", 1) for r in rows]
    ax.barh(names, [gib(r[2]) for r in rows], color=[r[1] for r in rows], height=0.6)
    ax.invert_yaxis()
    top = max([gib(r[2]) for r in rows] + [0.01])
    for y, (_, _, nbytes) in enumerate(rows):
        ax.text(gib(nbytes) + top * 0.03, y, f"{_label(nbytes)} GiB ({nbytes / (1 << 20):,.0f} MiB)", va="center",
                fontsize=8)
    ax.set_xlim(0, top * 1.9)
    ax.set_xlabel("GiB per GPU")
    where = f" (stage {plan.tightest})" if plan.request.pp > 1 else ""
    ax.set_title(f"terms under a GiB{where}", fontsize=10)


def plot_plan(plan, path):
    """Per-GPU memory: stacked bars (one per GPU) and a zoomed panel of the small terms; returns the figure."""
    plt = _pyplot()
    req = plan.request
    labels, bars = plan_bars(plan)
    fig, (ax, small) = plt.subplots(1, 2, figsize=(max(7.5, 0.8 * len(labels) + 5.5), 4.8),
                                    gridspec_kw={"width_ratios": [max(2.0, 0.5 * len(labels)), 1.6]})
    _stacked_bars(ax, labels, bars, plan.total_bytes)
    _small_terms_panel(small, plan)
    fig.suptitle(f"{plan.model} · {req.tp * req.pp} × {plan.gpu} (tp={req.tp}, pp={req.pp}): "
                 f"{plan.num_blocks:,} KV blocks", fontsize=11)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return fig


def _labelled_line(ax, xs, ys, fmt: str, colour: str, marker: str) -> None:
    """A line whose points carry their values, above each point, on a y axis from 0 with room for them."""
    ax.plot(xs, ys, marker + "-", color=colour)
    for x, y in zip(xs, ys):
        ax.annotate(format(y, fmt), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8,
                    color=colour)
    ax.set_ylim(0, max(ys) * 1.22 if max(ys) > 0 else 1.0)


def plot_scale(result, path):
    """Decode tokens/s (top) and efficiency (bottom) against the TP degree, each point labelled as the table
    prints it; returns the figure."""
    plt = _pyplot()
    ok = [r for r in result["rows"] if r.get("fits")]
    fig, (rate, eff) = plt.subplots(2, 1, sharex=True, figsize=(6.5, 5.6), gridspec_kw={"height_ratios": [3, 2]})
    rate.set_title(f"{result['model']} on {result['gpu']}, {result['seq_len']:,}-token sequences", fontsize=11)
    rate.set_ylabel("decode tokens/s\n(roofline)")
    eff.set_xlabel("tensor parallel degree")
    if ok:
        tps = [r["tp"] for r in ok]
        base = ok[0]
        _labelled_line(rate, tps, [r["decode_tokens_per_s"] for r in ok], ",.0f", "#4c72b0", "o")
        _labelled_line(eff, tps, [r["efficiency"] for r in ok], ".2f", "#c44e52", "s")
        eff.set_ylim(0, max([r["efficiency"] for r in ok] + [1.0]) * 1.25)
        eff.axhline(1.0, color="#777777", linewidth=0.7, linestyle=":")
        eff.annotate("1 = linear scaling", (1.0, 1.0), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                     textcoords="offset points", ha="right", va="bottom", fontsize=7, color="#777777")
        eff.set_ylabel(f"efficiency\nspeedup ÷ (GPUs ÷ {base['gpus']})", fontsize=9)
        eff.set_xscale("log", base=2)
        eff.set_xticks(tps, [str(t) for t in tps])
        eff.set_xlim(tps[0] / 1.3, tps[-1] * 1.3)
        eff.set_title(f"speedup and efficiency relative to tp={base['tp']} (the smallest TP that fits), as in "
                      "the table", fontsize=8, color="#555555")
    skipped = ", ".join(f"tp={r['tp']}" for r in result["rows"] if not r.get("fits"))
    if not ok:
        for ax in (rate, eff):
            ax.set_axis_off()
        rate.text(0.5, 0.5, f"no TP degree fits ({skipped}): see the table's reasons", transform=rate.transAxes,
                  ha="center", va="center", fontsize=10)
    elif skipped:
        rate.text(0.01, 0.97, f"does not fit: {skipped}", transform=rate.transAxes, va="top", fontsize=8,
                  color="#777777")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return fig
