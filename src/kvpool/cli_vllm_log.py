"""``kvpool plan --vllm-log``'s table: each figure the vLLM log gives beside the plan's, with the error."""
from __future__ import annotations

from .cli_layout import Col, emit, fit_table, indented


def _figure(value: float, unit: str) -> str:
    if unit == "GiB":
        return f"{value:,.2f}"
    if unit == "x":
        return f"{value:,.2f}×"
    return f"{int(value):,}"


def render_vllm_log(log, rows) -> None:
    """The comparison table; a note names the settings read from the log."""
    title = f"\n[bold]Against the vLLM log[/] (vLLM {log.version or '?'}; model {log.model or '?'})"
    if not rows:
        emit(title, indented("the log holds no memory figures (its lines 'Model loading took', "
                             "'Available KV cache memory', 'GPU KV cache size')"))
        return
    table = [[r.name, _figure(r.logged, r.unit), _figure(r.planned, r.unit), r.unit,
              "—" if r.error is None else f"{r.error:+.1%}"] for r in rows]
    cols = [Col("figure", "text"), Col("vLLM log"), Col("kvpool plan"), Col("unit"), Col("plan − log")]
    settings = ", ".join(f"{k}={v}" for k, v in sorted(log.settings.items())) or "none"
    emit(title, *fit_table(cols, table), indented(f"settings taken from the log (flags given here win): {settings}"))
