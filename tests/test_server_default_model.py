"""The embedded default model (SmolLM2-135M-Instruct) answers a factual prompt correctly."""

from __future__ import annotations

import pytest

from tests.server_harness import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    # No --model: the embedded SmolLM2 (converted once into the local cache on first use).
    srv = ServerProcess("--num-instances", "1", "--max-model-len", "512")
    yield srv
    srv.stop()


def test_models_lists_default_name(server):
    status, _, raw = server.request("GET", "/v1/models")
    assert status == 200 and b"SmolLM2-135M-Instruct" in raw


def test_greedy_capital_of_france(server):
    status, res = server.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                                  "temperature": 0})
    assert status == 200, res
    assert "Paris" in res["choices"][0]["text"], res


def test_greedy_chat_capital_of_france(server):
    status, res = server.post("/v1/chat/completions", {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "max_tokens": 12, "temperature": 0, "stream": False,
    })
    assert status == 200, res
    assert "Paris" in res["choices"][0]["message"]["content"], res
