"""Human output fits the terminal (issue 9, item 15): at 80 columns no line is longer than 80, no line
ends in spaces, no header word is cut ("efficien…") and no number is folded across lines; without a
terminal and without COLUMNS the output is 100 columns wide."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
GIB = 1 << 30


def _numbers_plan(d):
    kv = d["kv_cache"]
    return [f"{kv[k]:,}" for k in ("bytes_per_token_per_gpu", "bytes_per_block_per_gpu", "num_blocks", "tokens")] + \
        [f"{d['per_gpu'][k]:.2f}" for k in ("weights_gib", "kv_cache_gib", "total_gib")]


def _numbers_scale(d):
    return [f"{r['kv_tokens']:,}" for r in d["rows"] if r["fits"]] + \
        [f"{r['decode_tokens_per_s']:,.0f}" for r in d["rows"] if r["fits"]] + ["efficiency", "latency"]


def _numbers_comm(d):
    return [f"{r['decode_tokens_per_s']:,.0f}" for r in d["rows"]] + [f"{d['bytes_per_allreduce_prefill']:,}"]


def _ranks_file(tmp_path):
    f = tmp_path / "ranks.json"
    f.write_text(json.dumps([{"rank": r, "total": 80 * GIB, "free": (8 if r else 4) * GIB,
                              "allocated": 60 * GIB, "reserved": 70 * GIB, "peak": 69 * GIB} for r in range(4)]))
    return str(f)


CASES = [
    (["plan", "llama-3.1-70b", "--tp", "4", "--gpu", "a100-80gb"], _numbers_plan),
    (["plan", "llama-2-70b", "--tp", "4", "--gpu", "a100-80gb", "--weights-gib", "35", "--comm-gib", "4",
      "--activation-gib", "10", "--overhead-gib", "3", "--batch", "64", "--seq-len", "8192"], _numbers_plan),
    (["plan", "gemma-2-9b", "--tp", "2", "--pp", "2", "--gpu", "l40s", "--kv-dtype", "fp8"], _numbers_plan),
    (["plan", "deepseek-v3", "--tp", "8", "--pp", "2", "--gpu", "h200"], _numbers_plan),
    (["plan", "mixtral-8x7b", "--tp", "4", "--gpu", "a100-80gb", "--batch", "64", "--seq-len", "32768"], _numbers_plan),
    (["scale", "llama-3.1-70b", "--gpu", "h100-sxm"], _numbers_scale),
    (["scale", "llama-3.1-405b", "--gpu", "a100-80gb"], _numbers_scale),
    (["comm", "llama-3.1-70b", "--tp", "8", "--gpu", "h100-sxm"], _numbers_comm),
    (["diagnose", "RANKS"], None),
    (["models"], None),
    (["gpus"], None),
]


def _check_lines(out: str, width: int) -> None:
    assert out.strip(), "no output"
    for line in out.splitlines():
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}"
        assert line == line.rstrip(), f"trailing spaces: {line!r}"
    assert "…" not in out, "a cell or header was cut"


@pytest.mark.parametrize("argv,numbers", CASES, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_every_command_fits_80_columns(capsys, tmp_path, monkeypatch, argv, numbers):
    argv = [_ranks_file(tmp_path) if a == "RANKS" else a for a in argv]
    monkeypatch.setenv("COLUMNS", "80")
    assert main(argv) in (0, 1)
    out = capsys.readouterr().out
    _check_lines(out, 80)
    if numbers:
        assert main(argv + ["--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        text = " ".join(out.split())  # a number folded across two lines would not survive this join
        for n in numbers(d):
            assert f" {n}" in text or f"{n}" in out.split(), n


def test_plan_explanations_wrap_but_stay_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    main(["plan", "llama-3.1-70b", "--tp", "4", "--gpu", "a100-80gb"])
    out = capsys.readouterr().out
    words = " ".join(out.split())
    # the "how it is computed" text is still all there, wrapped rather than cut
    assert "peak in sampler: 256 rows × 128,256 vocab" in words
    assert "ring 24 ch × 12 MiB of LL+LL128+Simple" in words


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_not_a_terminal_falls_back_to_100_columns():
    proc = subprocess.run([sys.executable, "-m", "kvpool.cli", "scale", "llama-3.1-70b", "--gpu", "h100-sxm"],
                          capture_output=True, text=True, env=_env(), check=True)
    _check_lines(proc.stdout, 100)
    assert max(len(line) for line in proc.stdout.splitlines()) > 80  # it does use the room it has


def test_columns_env_is_honoured_in_a_pipe():
    proc = subprocess.run([sys.executable, "-m", "kvpool.cli", "plan", "llama-3.1-70b", "--tp", "4"],
                          capture_output=True, text=True, env=_env(COLUMNS="80"), check=True)
    _check_lines(proc.stdout, 80)


@pytest.mark.parametrize("argv", [["plan", "llama-2-70b", "--tp", "4", "--gpu", "a100-80gb", "--weights-gib", "35",
                                   "--batch", "32", "--seq-len", "4096"], ["scale", "llama-3.1-8b", "--gpu", "l4"]])
def test_colour_output_has_no_blanks_hidden_among_colour_codes(capsys, monkeypatch, argv):
    """In a terminal rich styles the padding too: the blanks sit between colour codes at the line's end."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out
    _check_lines(re.sub(r"\x1b\[[0-9;]*m", "", out), 80)
