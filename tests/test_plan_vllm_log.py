"""``kvpool plan --vllm-log``: a vLLM start-up log's settings and figures, read and set beside the plan's.

The log lines are written in vLLM 0.19's formats (vllm/v1/engine/core.py, entrypoints/utils.py,
v1/worker/gpu_model_runner.py, v1/worker/gpu_worker.py, v1/core/kv_cache_utils.py, utils/mem_utils.py);
their figures are inputs for the reader under test, not measurements.
"""
import json

import pytest

from kvpool import cli
from kvpool.errors import InvalidArgumentError
from kvpool.plan import plan_memory
from kvpool.plan.vllm_log import compare_with_plan, parse_vllm_log

GIB = 2**30
LOG = """\
INFO 11-27 10:00:00 [utils.py:233] non-default args: {'model_tag': 'meta-llama/Llama-3.1-8B-Instruct', \
'model': 'meta-llama/Llama-3.1-8B-Instruct', 'tensor_parallel_size': 2, 'max_model_len': 32768, \
'gpu_memory_utilization': 0.92, 'max_num_seqs': 512}
(EngineCore pid=100) INFO 11-27 10:00:05 [core.py:106] Initializing a V1 LLM engine (v0.19.0) with config: \
model='meta-llama/Llama-3.1-8B-Instruct', speculative_config=None, tokenizer='meta-llama/Llama-3.1-8B-Instruct', \
skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, tokenizer_revision=None, trust_remote_code=False, \
dtype=torch.bfloat16, max_seq_len=32768, download_dir=None, load_format=auto, tensor_parallel_size=2, \
pipeline_parallel_size=1, data_parallel_size=1, decode_context_parallel_size=1, dcp_comm_backend=ag_rs, \
disable_custom_all_reduce=False, quantization=None, enforce_eager=False, enable_return_routed_experts=False, \
kv_cache_dtype=auto, device_config=cuda, seed=0, served_model_name=meta-llama/Llama-3.1-8B-Instruct, \
enable_prefix_caching=True, enable_chunked_prefill=True, pooler_config=None, compilation_config={'level': 3}
(Worker_TP0 pid=101) INFO 11-27 10:00:40 [gpu_model_runner.py:4821] Model loading took 7.52 GiB memory and 3.1 seconds
(Worker_TP1 pid=102) INFO 11-27 10:00:40 [gpu_model_runner.py:4821] Model loading took 7.53 GiB memory and 3.2 seconds
(Worker_TP0 pid=101) DEBUG 11-27 10:00:50 [gpu_worker.py:432] Memory profiling takes 9.10 seconds. Total non KV \
cache memory: 10.80GiB; torch peak memory increase: 1.18GiB; non-torch forward increase memory: 2.10GiB; weights \
memory: 7.52GiB.
(Worker_TP0 pid=101) INFO 11-27 10:00:50 [gpu_worker.py:437] Available KV cache memory: 62.04 GiB
(Worker_TP1 pid=102) INFO 11-27 10:00:50 [gpu_worker.py:437] Available KV cache memory: 62.01 GiB
(EngineCore pid=100) INFO 11-27 10:00:51 [kv_cache_utils.py:1319] GPU KV cache size: 1,016,048 tokens
(EngineCore pid=100) INFO 11-27 10:00:51 [kv_cache_utils.py:1325] Maximum concurrency for 32,768 tokens per request: 31.01x
"""


def test_the_log_gives_settings_and_figures():
    log = parse_vllm_log(LOG)
    assert (log.version, log.model) == ("0.19.0", "meta-llama/Llama-3.1-8B-Instruct")
    assert log.settings == {"tp": 2, "pp": 1, "max_model_len": 32768, "dtype": "bfloat16", "kv_dtype": "auto",
                            "enforce_eager": False, "mem_fraction": 0.92, "max_seqs": 512}
    assert log.weights == round(7.52 * GIB)  # the first rank's
    assert log.kv == round(62.01 * GIB)  # the smallest rank's: vLLM keeps the group's minimum
    assert (log.activation, log.non_torch) == (round(1.18 * GIB), round(2.10 * GIB))
    assert log.kv_tokens == 1_016_048 and log.concurrency == (32_768, 31.01)


def test_each_figure_is_set_beside_the_plans():
    log = parse_vllm_log(LOG)
    plan = plan_memory("llama-3.1-8b", tp=2, max_model_len=32768, mem_fraction=0.92, max_seqs=512)
    rows = {r.name: r for r in compare_with_plan(log, plan)}
    assert set(rows) == {"weights", "activation peak (torch)", "non-torch (comm + overhead)", "KV cache",
                         "GPU KV cache size", "max concurrency at 32,768 tokens"}
    kv = rows["KV cache"]
    assert kv.logged == 62.01 and kv.planned == round(plan.tight.kv_bytes / GIB, 2)
    assert kv.error == pytest.approx((kv.planned - 62.01) / 62.01)
    assert rows["GPU KV cache size"].planned == plan.kv_cache.vllm.tokens


def test_the_command_plans_with_the_logs_settings_and_prints_the_comparison(tmp_path, capsys):
    path = tmp_path / "vllm.log"
    path.write_text(LOG)
    assert cli.main(["plan", "--vllm-log", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parallel"]["tp"] == 2 and out["kv_cache"]["max_model_len"] == 32768
    assert out["per_gpu"]["mem_fraction"] == 0.92
    assert [r["name"] for r in out["vllm_log"]["rows"]][0] == "weights"
    assert cli.main(["plan", "--vllm-log", str(path), "--tp", "4", "--json"]) == 0  # a flag given here wins
    assert json.loads(capsys.readouterr().out)["parallel"]["tp"] == 4
    assert cli.main(["plan", "--vllm-log", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Against the vLLM log" in text and "62.01" in text and "1,016,048" in text


def test_a_non_literal_args_dict_is_skipped_and_the_engine_config_still_read():
    log = parse_vllm_log("INFO non-default args: {'model': 'x', 'compilation_config': CompilationConfig(level=3)}\n"
                         "INFO Initializing a V1 LLM engine (v0.19.0) with config: model='Qwen/Qwen3-8B', "
                         "dtype=torch.bfloat16, max_seq_len=40960, tensor_parallel_size=1, enforce_eager=True\n")
    assert log.model == "Qwen/Qwen3-8B" and log.settings["enforce_eager"] is True
    assert log.settings["max_model_len"] == 40960 and log.weights is None


def test_a_file_that_is_not_a_vllm_log_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(InvalidArgumentError, match="none of vLLM's start-up lines"):
        parse_vllm_log("hello\nworld\n")
    path = tmp_path / "other.log"
    path.write_text("nothing here\n")
    assert cli.main(["plan", "llama-3.1-8b", "--vllm-log", str(path)]) == 2
    assert "none of vLLM's start-up lines" in capsys.readouterr().err
    assert cli.main(["plan", "llama-3.1-8b", "--vllm-log", str(tmp_path / "missing.log")]) == 2
    assert "cannot read the vLLM log" in capsys.readouterr().err


def test_the_accuracy_script_summarises_a_set_of_logs(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "plan_vs_vllm_logs.py"
    spec = importlib.util.spec_from_file_location("plan_vs_vllm_logs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    good, refused = tmp_path / "a.log", tmp_path / "b.log"
    good.write_text(LOG)
    refused.write_text(LOG.replace("meta-llama/Llama-3.1-8B-Instruct", "acme/NoSuchModel-1B"))
    rows = [module.plan_log(str(good), "h100-sxm"), module.plan_log(str(refused), "h100-sxm")]
    plan = plan_memory("llama-3.1-8b", tp=2, max_model_len=32768, mem_fraction=0.92, max_seqs=512, dtype="bfloat16")
    assert rows[0]["kv_error"] == pytest.approx((plan.tight.kv_bytes - round(62.01 * GIB)) / round(62.01 * GIB))
    assert "unknown model" in rows[1]["refused"]
    s = module.summary(rows)
    assert s["logs"] == 2 and s["refused"] == 1 and s["kv_median_abs_error"] == abs(rows[0]["kv_error"])
