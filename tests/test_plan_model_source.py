"""Hugging Face repo ids resolve to the local HF cache, else to the preset of the same model (issue 9 item 17)."""
import dataclasses
import json
import socket

import pytest

from kvpool.cli import main
from kvpool.errors import ConfigError
from kvpool.plan import load_model_spec
from kvpool.plan.model import PRESET_DIR


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """Every test starts with an empty cache of its own (the machine's real cache must not decide)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for var in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model resolution touched the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _same_model(spec, preset: str) -> bool:
    ref = load_model_spec(preset)
    return dataclasses.replace(spec, name=ref.name) == ref


@pytest.mark.parametrize("repo_id,preset", [
    ("meta-llama/Llama-3.1-70B-Instruct", "llama-3.1-70b"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-2-70b-chat-hf", "llama-2-70b"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),
    ("google/gemma-2-9b-it", "gemma-2-9b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
    ("deepseek-ai/DeepSeek-V3", "deepseek-v3"),
    ("LLAMA-3.1-70B-INSTRUCT", "llama-3.1-70b"),
])
def test_repo_id_falls_back_to_the_preset_of_the_same_model(repo_id, preset, empty_hf_cache):
    spec = load_model_spec(repo_id)
    assert spec.name == repo_id and _same_model(spec, preset)
    assert spec.source.startswith(f"preset {preset} ") and str(empty_hf_cache) in spec.source


@pytest.mark.parametrize("repo_id", ["mistralai/Mistral-7B-Instruct-v0.2",  # another config than v0.1 / v0.3
                                     "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8",  # other weights
                                     "meta-llama/Llama-3.1-7B"])
def test_other_models_are_unknown_with_the_suggestion_list(repo_id, empty_hf_cache):
    with pytest.raises(ConfigError, match="did you mean") as e:
        load_model_spec(repo_id)
    assert repo_id in str(e.value) and str(empty_hf_cache) in str(e.value)


def _cache_repo(cache, repo_id: str, cfg: dict, revision: str = "abc123", main: bool = True):
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snap = folder / "snapshots" / revision
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(revision)
    return snap / "config.json"


def _llama_8b(**changes) -> dict:
    return {**json.loads((PRESET_DIR / "llama-3.1-8b.json").read_text()), **changes}


def test_cached_config_json_wins_over_the_preset(empty_hf_cache):
    path = _cache_repo(empty_hf_cache, "meta-llama/Llama-3.1-8B-Instruct", _llama_8b(num_hidden_layers=30))
    spec = load_model_spec("meta-llama/Llama-3.1-8B-Instruct")
    assert spec.num_layers == 30 and spec.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert "local Hugging Face cache" in spec.source and str(path) in spec.source


def test_cache_folder_case_and_refs_main(empty_hf_cache):
    _cache_repo(empty_hf_cache, "Org/Tiny", _llama_8b(num_hidden_layers=3), revision="old")
    _cache_repo(empty_hf_cache, "Org/Tiny", _llama_8b(num_hidden_layers=5), revision="new", main=False)
    assert load_model_spec("org/tiny").num_layers == 3  # refs/main names "old", though "new" is newer


@pytest.mark.parametrize("layout", ["HF_HOME", "XDG_CACHE_HOME", "HOME"])
def test_cache_location_follows_the_environment(layout, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    root = tmp_path / layout.lower()
    cache = {"HF_HOME": root / "hub", "XDG_CACHE_HOME": root / "huggingface" / "hub",
             "HOME": root / ".cache" / "huggingface" / "hub"}[layout]
    monkeypatch.setenv(layout, str(root))
    _cache_repo(cache, "org/tiny", _llama_8b(num_hidden_layers=7))
    assert load_model_spec("org/tiny").num_layers == 7


def test_presets_and_paths_keep_their_meaning(tmp_path):
    assert load_model_spec("llama-3.1-8b").source == "preset llama-3.1-8b"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_llama_8b()))
    assert load_model_spec(tmp_path).source == f"config.json at {path}"
    assert dataclasses.replace(load_model_spec(path), name="x") == dataclasses.replace(load_model_spec("llama-3.1-8b"), name="x")


def test_source_is_not_part_of_the_model_identity():
    a = load_model_spec("meta-llama/Llama-3.1-8B")
    b = dataclasses.replace(load_model_spec("llama-3.1-8b"), name=a.name)
    assert a == b and a.source != b.source
    assert "source" not in a.to_dict()


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [("plan", "meta-llama/Llama-3.1-70B-Instruct", "--tp", "4"),
                                  ("plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--tp", "2"),
                                  ("plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "a100-80gb")])
def test_cli_takes_a_pasted_vllm_model(capsys, argv):
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "model: preset llama-3.1-" in " ".join(out.split())


def test_cli_json_says_which_config_it_read(capsys):
    code, out, _ = _run(capsys, "plan", "meta-llama/Llama-3.1-70B-Instruct", "--tp", "4", "--json")
    assert code == 0
    assert json.loads(out)["details"]["model_source"].startswith("preset llama-3.1-70b ")


def test_cli_unknown_repo_lists_presets(capsys):
    code, _, err = _run(capsys, "plan", "meta-llama/Llama-3.1-7B")
    assert code == 2 and "did you mean llama-3.1-70b" in err
