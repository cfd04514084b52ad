"""The kvpool command: output, JSON, vLLM aliases, charts, errors (one line, non-zero, no traceback)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_command_human_output(capsys):
    code, out, err = run(capsys, "plan", "llama-3.1-70b", "--tp", "4", "--gpu", "a100-80gb")
    assert code == 0 and err == ""
    for text in ("4 × A100-SXM4-80GB", "81,920", "80 layers × 2 KV heads × (128 + 128) × 2 B", "KV cache", "blocks",
                 "0.9 × 80.00 GiB = 72.00 GiB"):
        assert text in out


def test_seed_example_json(capsys):
    code, out, _ = run(capsys, "plan", "llama-2-70b", "a100-80gb", "--tp", "4", "--weights-gib", "35", "--comm-gib", "4",
                       "--activation-gib", "10", "--overhead-gib", "3", "--batch", "32", "--seq-len", "4096", "--json")
    d = json.loads(out)
    assert code == 0
    assert d["per_gpu"]["kv_cache_gib"] == 28.0 and d["kv_cache"]["bytes_per_token_per_gpu"] == 81920
    assert d["kv_cache"]["tokens_unpaged"] == 367001 and d["workload"]["tokens_per_request_unpaged"] == 11468


def test_vllm_flag_aliases_give_the_same_plan(capsys):
    _, ours, _ = run(capsys, "plan", "llama-3.1-8b", "--tp", "2", "--gpu", "l40s", "--mem-fraction", "0.85",
                     "--max-batched-tokens", "4096", "--max-seqs", "128", "--kv-dtype", "fp8", "--json")
    _, vllm, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--gpu", "l40s", "--tensor-parallel-size", "2",
                     "--gpu-memory-utilization", "0.85", "--max-num-batched-tokens", "4096", "--max-num-seqs", "128",
                     "--kv-cache-dtype", "fp8", "--trust-remote-code", "--port", "8000", "--json")
    assert json.loads(ours) == json.loads(vllm)
    assert json.loads(ours)["kv_cache"]["kv_dtype"] == "fp8"


def test_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "plan.png"
    code, out, _ = run(capsys, "plan", "llama-3.1-70b", "--tp", "4", "--gpu", "a100-80gb", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spng = tmp_path / "scale.png"
    assert main(["scale", "llama-3.1-8b", "--gpu", "l4", "--plot", str(spng)]) == 0
    assert spng.read_bytes()[:4] == b"\x89PNG"


def test_scale_comm_models_gpus(capsys):
    code, out, _ = run(capsys, "scale", "llama-3.1-70b", "--gpu", "h100-sxm", "--json")
    assert code == 0 and [r["tp"] for r in json.loads(out)["rows"]] == [1, 2, 4, 8]
    code, out, _ = run(capsys, "comm", "llama-3.1-70b", "--tp", "8", "--gpu", "h100-sxm")
    assert code == 0 and "161 all-reduces per forward" in out and "PCIe Gen4" in out
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and len(json.loads(out)) >= 17
    code, out, _ = run(capsys, "gpus")
    assert code == 0 and "A100-SXM4-80GB" in out and "NVLink 4" in out


def test_comm_reads_nccl_env(capsys, monkeypatch):
    monkeypatch.setenv("NCCL_BUFFSIZE", str(1 << 20))
    monkeypatch.setenv("NCCL_PROTO", "Simple")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    _, out, _ = run(capsys, "comm", "llama-3.1-70b", "--tp", "4", "--gpu", "h100-sxm", "--nccl-channels", "8", "--json")
    m = json.loads(out)["memory"]
    # NCCL_PROTO leaves the buffers alone: 4,096 + LL + LL128 + 1 MiB -> 8 MiB received, 2 MiB sent, per channel
    assert m["nccl_protocol_buffers_bytes"] == 8 * (8 + 2) * (1 << 20) and m["nccl_nvls_bytes"] == 0


def test_diagnose(tmp_path, capsys):
    f = tmp_path / "ranks.json"
    gib = 1 << 30
    f.write_text(json.dumps([{"rank": r, "total": 80 * gib, "free": (8 if r else 4) * gib} for r in range(4)]))
    code, out, _ = run(capsys, "diagnose", str(f))
    assert code == 0 and "rank 0 is much heavier" in out and "figures: rank 0 uses 76.00 GiB" in out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "llama-2-70b", "--tp", "3"], "does not divide the 64 attention heads"),
    (["plan", "llama-2-70b", "--pp", "100"], "pp=100 is larger than the 80 layers"),
    (["plan", "llama-2-70b", "--gpu-mem-gib", "-5"], "gpu_mem_gib must be > 0"),
    (["plan", "llama-2-70b", "--gpu-mem-gib", "0"], "gpu_mem_gib must be > 0"),
    (["plan", "llama-2-70b", "--mem-fraction", "1.5"], "mem_fraction must be in (0, 1]"),
    (["plan", "llama-2-70b", "--tp", "1", "--gpu", "a100-80gb"], "over by"),
    (["plan", "llama-2-70b", "--tp", "4", "--block-size", "12"], "power of two"),
    (["plan", "lama-2-70b"], "did you mean llama-2-70b"),
    (["plan", "llama-2-70b", "--tp", "four"], "invalid int value"),
    (["plan"], "give a model"),
    (["frobnicate"], "invalid choice"),
    (["diagnose", "/nonexistent/file.json"], "cannot read"),
])
def test_errors_are_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code != 0 and out == ""
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_config_file(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 32000,
                               "intermediate_size": 11008}))
    code, _, err = run(capsys, "plan", str(tmp_path), "--gpu", "a100-80gb")
    assert code == 2 and "num_hidden_layers" in err and err.count("\n") == 1


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_never_imports_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvpool.cli", "plan", "llama-3.1-70b", "--tp", "4",
                           "--gpu", "a100-80gb"], capture_output=True, text=True, env=_env(), check=True)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "numpy" not in imported and "matplotlib" not in imported
    assert "kvpool.plan.memory" in imported


def test_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "kvpool.cli", "plan", "llama-2-70b", "--tp", "3"],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("kvpool: error: tp=3 does not divide")
