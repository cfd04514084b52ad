"""Bad numbers on the command line: each is a one-line error with status 2, never a silently wrong plan
(issue 9, items 13 and 14), and each subcommand refuses the flags it would ignore (item 24)."""
import json

import pytest

from kvpool.cli import main

GIB = 1 << 30
M70 = ["llama-3.1-70b", "--gpu", "h100-sxm"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needle", [
    # TP degree 0 used to become the default degree (tp=1 for plan, 4 for comm)
    (["plan", "llama-3.1-8b", "--tp", "0"], "tp must be a positive integer, got 0"),
    (["plan", "llama-3.1-8b", "--tp", "-2"], "tp must be a positive integer, got -2"),
    (["comm", *M70, "--tp", "0"], "tp must be a positive integer, got 0"),
    (["diagnose", "ranks.json", "--model", "llama-3.1-8b", "--tp", "0"], "tp must be a positive integer, got 0"),
    # NCCL knobs: negative channels gave negative communication memory and more KV blocks
    (["plan", *M70, "--tp", "4", "--nccl-channels", "-1"], "NCCL_MAX_NCHANNELS"),
    (["plan", *M70, "--tp", "4", "--nccl-channels", "0"], "NCCL_MAX_NCHANNELS"),
    (["plan", *M70, "--tp", "4", "--nccl-buffsize", "-1"], "NCCL_BUFFSIZE"),
    (["comm", *M70, "--tp", "4", "--nccl-buffsize", "0"], "NCCL_BUFFSIZE"),
    (["plan", *M70, "--tp", "4", "--staging-layers", "0"], "staging_layers"),
    (["plan", *M70, "--tp", "4", "--staging-layers", "-3"], "staging_layers"),
    # flags a subcommand would ignore
    (["comm", *M70, "--tp", "4", "--plot", "x.png"], "unrecognized arguments: --plot"),
    (["comm", *M70, "--tp", "4", "--pp", "2"], "unrecognized arguments: --pp"),
    (["scale", *M70, "--tp", "4"], "--tps"),
    (["scale", *M70, "--tensor-parallel-size", "4"], "--tps"),
    (["diagnose", "ranks.json", "--tp", "2"], "--model"),
    (["diagnose", "ranks.json", "--mem-fraction", "0.8"], "--model"),
    # scale: zero/negative lengths and batches, and bad settings that used to become "does not fit" rows
    (["scale", "llama-3.1-70b", "--gpu", "a100-80gb", "--seq-len", "0"], "seq_len must be a positive integer, got 0"),
    (["scale", *M70, "--seq-len", "-5"], "seq_len must be a positive integer, got -5"),
    (["scale", *M70, "--batch", "0"], "batch must be a positive integer, got 0"),
    (["scale", *M70, "--batch", "-1"], "batch must be a positive integer, got -1"),
    (["scale", *M70, "--tps", "0,2"], "--tps must list positive integers"),
    (["scale", *M70, "--block-size", "12"], "power of two"),
    (["scale", *M70, "--pp", "0"], "pp must be a positive integer, got 0"),
    (["scale", *M70, "--pp", "100"], "pp=100 is larger than the 80 layers"),
    (["scale", *M70, "--mem-fraction", "nan"], "mem_fraction must be in (0, 1]"),
    (["scale", *M70, "--max-seqs", "0"], "max_seqs must be a positive integer, got 0"),
    # comm: zero/negative lengths and batches (seq_len 0 was a ZeroDivisionError)
    (["comm", *M70, "--tp", "4", "--seq-len", "0"], "seq_len must be a positive integer, got 0"),
    (["comm", *M70, "--tp", "4", "--batch", "0"], "batch must be a positive integer, got 0"),
    (["comm", *M70, "--tp", "4", "--batch", "-3"], "batch must be a positive integer, got -3"),
    (["comm", *M70, "--tp", "4", "--interconnects", ","], "--interconnects"),
    # plan: every other number
    (["plan", *M70, "--gpu-mem-gib", "nan"], "gpu_mem_gib must be a number of GiB"),
    (["plan", *M70, "--headroom", "nan"], "headroom_gib must be a number of GiB"),
    (["plan", *M70, "--weights-gib", "-1"], "weights_gib must be >= 0 GiB"),
    (["plan", *M70, "--mem-fraction", "0"], "mem_fraction must be in (0, 1]"),
    (["plan", *M70, "--max-model-len", "0"], "max_model_len must be a positive integer"),
    (["plan", *M70, "--max-batched-tokens", "-8"], "max_batched_tokens must be a positive integer"),
    (["plan", *M70, "--cuda-context-mib", "-1"], "cuda_context_mib must be a positive integer"),
    (["plan", *M70, "--tp", "4", "--batch", "0", "--seq-len", "4096"], "batch must be a positive integer"),
    (["plan", *M70, "--tp", "4", "--batch", "8", "--seq-len", "-1"], "seq_len must be a positive integer"),
])
def test_bad_numbers_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ranks.json").write_text(json.dumps([{"rank": 0, "total": 80 * GIB, "free": 8 * GIB}]))
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert needle in err and err.count("\n") == 1 and "internal error" not in err


@pytest.mark.parametrize("ranks,needle", [
    # free above total used to print "used -4.66 GiB ... ok"
    ([{"rank": 0, "total": 80 * GIB, "free": int(84.66 * GIB)}], "free"),
    ([{"rank": 0, "total": 0, "free": 0}], "total"),
    ([{"rank": 0, "total": float("nan"), "free": 1}], "'total'"),
    ([{"rank": 0, "total": 80 * GIB, "free": float("inf")}], "'free'"),
    ([{"rank": "zero", "total": 80 * GIB, "free": GIB}], "rank"),
    ([{"rank": 0, "total": 80 * GIB, "free": GIB}, {"rank": 0, "total": 80 * GIB, "free": GIB}], "rank 0 appears twice"),
])
def test_diagnose_refuses_impossible_snapshots(capsys, tmp_path, ranks, needle):
    f = tmp_path / "ranks.json"
    f.write_text(json.dumps(ranks))
    code, out, err = run(capsys, "diagnose", str(f))
    assert (code, out) == (2, "") and needle in err and "internal error" not in err


@pytest.mark.parametrize("csv,needle", [
    ("index, memory.used [MiB], memory.total [MiB]\n0, 90000 MiB, 81559 MiB\n", "above total"),
    ("index, memory.used [MiB], memory.total [MiB]\n0, -5 MiB, 81559 MiB\n", "-5"),
    ("index, memory.used [MiB], memory.total [MiB]\n0, inf MiB, 81559 MiB\n", "inf"),
    ("index, memory.used [MiB], memory.total [MiB]\nx, 5 MiB, 81559 MiB\n", "index"),
])
def test_diagnose_refuses_impossible_csv(capsys, tmp_path, csv, needle):
    f = tmp_path / "smi.csv"
    f.write_text(csv)
    code, out, err = run(capsys, "diagnose", str(f))
    assert (code, out) == (2, "") and needle in err and "internal error" not in err


def test_explicit_values_do_what_they_say(capsys):
    """The defaults apply only when a flag is absent; a given value is used as given."""
    _, one, _ = run(capsys, "plan", "llama-3.1-8b", "--json")
    assert json.loads(one)["parallel"]["tp"] == 1
    _, comm, _ = run(capsys, "comm", *M70, "--json")
    assert json.loads(comm)["tp"] == 4
    _, comm2, _ = run(capsys, "comm", *M70, "--tp", "2", "--json")
    assert json.loads(comm2)["tp"] == 2
    _, small, _ = run(capsys, "plan", *M70, "--tp", "4", "--nccl-buffsize", str(1 << 20), "--nccl-channels", "8",
                      "--no-nvls", "--json")
    nccl = json.loads(small)["details"]["comm_bytes"]["nccl_tp"]
    # per channel: 4,096 + LL + LL128 + 1 MiB received (-> 8 MiB, 2 MiB multiples) + 4,096 sent (-> 2 MiB)
    assert nccl["channels"] == 8 and nccl["protocol_buffers"] == 8 * (8 + 2) * (1 << 20)


def test_scale_sorts_and_dedupes_tps(capsys):
    """Efficiency is relative to the smallest degree, so the degrees are taken in order, once each."""
    code, out, _ = run(capsys, "scale", *M70, "--tps", "8,2,8,4", "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and [r["tp"] for r in rows] == [2, 4, 8] and rows[0]["speedup"] == 1.0


def test_a_batch_the_pool_cannot_hold_is_capped_with_a_note(capsys):
    code, out, _ = run(capsys, "comm", *M70, "--tp", "4", "--batch", "100000")
    assert code == 0 and "decode batch 100,000 capped at" in " ".join(out.split())
    _, js, _ = run(capsys, "comm", *M70, "--tp", "4", "--batch", "100000", "--json")
    rep = json.loads(js)
    assert rep["batch_requested"] == 100000 and 0 < rep["batch"] < 100000
    code, js, _ = run(capsys, "scale", *M70, "--batch", "200", "--json")
    summary = json.loads(js)["summary"]
    assert code == 0 and any(line.startswith("tp=2: batch 200 capped at") for line in summary)
