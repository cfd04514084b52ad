"""Fixtures the demo's test modules share; each module defines its own ``config`` fixture (the model it serves).

Import them by name (``from demo_util import hf, one_thread, weights  # noqa: F401``): pytest then uses them as
that module's fixtures, ``one_thread`` automatically.
"""
import pytest
import torch

from kvpool.demo.hf_reference import build_hf_model, hf_greedy
from kvpool.demo.model import random_llama_weights

SEED = 0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matmuls only slow down with more on this shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(config):
    return random_llama_weights(config, seed=SEED)


@pytest.fixture(scope="module")
def hf(config, weights):
    return build_hf_model(config, weights)


def assert_matches_hf(hf, requests, report) -> None:
    """Every request finished without error and its tokens equal transformers' greedy ones."""
    for r in requests:
        result = report.summary.results[r.req_id]
        assert result.error is None, result.error
        assert result.output == hf_greedy(hf, r.prompt, r.max_new_tokens), f"request {r.req_id}"
