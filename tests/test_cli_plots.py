"""``--plot`` charts: files written, plotted values equal the table's, axes hold every point (issue 9 item 20)."""
import pytest

pytest.importorskip("matplotlib")

from kvpool.cli import main  # noqa: E402
from kvpool.cli_plots import PLAN_TERMS, SMALL_TERMS, plot_plan, plot_scale  # noqa: E402
from kvpool.errors import InvalidArgumentError  # noqa: E402
from kvpool.plan.memory import plan_memory  # noqa: E402
from kvpool.plan.scaling import scale  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(capsys, monkeypatch, *argv) -> str:
    monkeypatch.setenv("COLUMNS", "160")
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return " ".join(out.split())


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000


def test_plan_plot_is_written_and_labels_the_tables_gib(tmp_path, capsys, monkeypatch):
    path = tmp_path / "plan.png"
    table = _run(capsys, monkeypatch, "plan", "llama-3.1-70b", "--tp", "4", "--gpu", "a100-80gb", "--plot", str(path))
    assert _is_png(path)
    plan = plan_memory("llama-3.1-70b", 4, gpu="a100-80gb")
    fig = plot_plan(plan, tmp_path / "again.png")
    bars_ax, small_ax = fig.axes
    g = plan.per_gpu
    # stacked bars: 4 GPUs x 6 terms, in PLAN_TERMS order, each height the table's figure
    heights = [p.get_height() for p in bars_ax.patches]
    assert heights == pytest.approx([g[key] for key, _, _ in PLAN_TERMS for _ in range(4)])
    labels = [t.get_text() for t in bars_ax.texts]
    for key in ("weights_gib", "kv_cache_gib", "headroom_gib"):
        shown = f"{g[key]:.2f}"
        assert labels.count(shown) == 4 and shown in table  # one label per GPU, the table's own string
    # the sub-GiB terms on their own scale, labelled with the table's figure
    assert [p.get_width() for p in small_ax.patches] == pytest.approx([g[key] for key in SMALL_TERMS])
    for key, text in zip(SMALL_TERMS, (t.get_text() for t in small_ax.texts)):
        assert text.startswith(f"{g[key]:.2f} GiB") and f"{g[key]:.2f}" in table
    assert small_ax.get_xlim()[1] > max(g[key] for key in SMALL_TERMS)


def test_plan_plot_with_pipeline_stages(tmp_path):
    plan = plan_memory("llama-3.1-405b", 8, 2, gpu="h100-sxm", kv_dtype="fp8")
    fig = plot_plan(plan, tmp_path / "pp.png")
    assert _is_png(tmp_path / "pp.png")
    weights = [p.get_height() for p in fig.axes[0].patches][:16]
    assert weights == pytest.approx([s["weights_gib"] for s in plan.stages for _ in range(8)])


def test_scale_plot_values_definition_and_axes(tmp_path, capsys, monkeypatch):
    path = tmp_path / "scale.png"
    table = _run(capsys, monkeypatch, "scale", "llama-3.1-70b", "--gpu", "a100-80gb", "--plot", str(path))
    assert _is_png(path)
    result = scale("llama-3.1-70b", "a100-80gb")
    ok = [r for r in result["rows"] if r.get("fits")]
    fig = plot_scale(result, tmp_path / "again.png")
    rate_ax, eff_ax = fig.axes
    (rate_line,), (eff_line,) = rate_ax.get_lines(), [ln for ln in eff_ax.get_lines() if len(ln.get_xdata()) > 1
                                                      and list(ln.get_xdata()) == [r["tp"] for r in ok]]
    assert list(rate_line.get_ydata()) == [r["decode_tokens_per_s"] for r in ok]
    assert list(eff_line.get_ydata()) == [r["efficiency"] for r in ok]
    # the labels are the table's strings
    assert [t.get_text() for t in rate_ax.texts if t.get_text()[0].isdigit()] == [f"{r['decode_tokens_per_s']:,.0f}" for r in ok]
    eff_labels = [t.get_text() for t in eff_ax.texts if t.get_text()[0].isdigit() and "=" not in t.get_text()]
    assert eff_labels == [f"{r['efficiency']:.2f}" for r in ok]
    assert all(f"{r['speedup']:.2f}× {r['efficiency']:.2f}" in table for r in ok)
    # the definition on the axis is the table's: speedup / (GPUs / GPUs of the first TP that fits)
    base = ok[0]
    assert f"speedup ÷ (GPUs ÷ {base['gpus']})" in eff_ax.get_ylabel()
    assert [r["speedup"] / (r["gpus"] / base["gpus"]) for r in ok] == pytest.approx([r["efficiency"] for r in ok])
    # every point inside its axes (the efficiency axis was fixed at 0-1.1 while values are ~8-10), no legend on data
    for ax, values in ((rate_ax, rate_line.get_ydata()), (eff_ax, eff_line.get_ydata())):
        low, high = ax.get_ylim()
        assert low <= min(values) and max(values) < high
        assert ax.get_legend() is None


def test_scale_plot_when_nothing_fits(tmp_path):
    result = scale("llama-3.1-405b", "a100-80gb")
    assert not any(r.get("fits") for r in result["rows"])
    fig = plot_scale(result, tmp_path / "none.png")
    assert _is_png(tmp_path / "none.png")
    assert any("no TP degree fits" in t.get_text() for t in fig.axes[0].texts)


def test_unwritable_chart_path_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot write the chart"):
        plot_plan(plan_memory("llama-3.1-8b"), tmp_path / "missing-dir" / "plan.png")


def test_plot_code_lives_in_cli_plots():
    import kvpool.cli_render as render

    assert not any(hasattr(render, name) for name in ("plot_plan", "plot_scale", "_pyplot", "_save"))
