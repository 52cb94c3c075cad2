"""`vllm bench serve` drives our server unchanged: both backends, both endpoints, zero failures and
exact token counts. Runs only where a vLLM executable is given (ASCENDRA_VLLM_BIN=/path/to/venv/bin/vllm);
vLLM is never a dependency of this project."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ascendra.models import resolve_model
from tests.server_harness import ServerProcess

VLLM_BIN = os.environ.get("ASCENDRA_VLLM_BIN")
SHIM = Path(__file__).resolve().parents[1] / "bench" / "vllm_shim"

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not VLLM_BIN or not os.access(VLLM_BIN, os.X_OK),
                                 reason="set ASCENDRA_VLLM_BIN to a vllm executable to run vllm bench serve")]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--model", "tiny", "--num-instances", "1", "--max-model-len", "1024", "--default-policy")
    yield srv
    srv.stop()


def _field(out: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}:\s+([0-9.]+)", out, re.M)
    assert m, f"{name!r} missing from vllm bench output:\n{out[-3000:]}"
    return float(m.group(1))


@pytest.mark.parametrize("backend,endpoint", [
    ("openai", "/v1/completions"), ("vllm", "/v1/completions"), ("openai-chat", "/v1/chat/completions"),
])
def test_vllm_bench_serve_against_our_server(server, backend, endpoint):
    n, out_len = 6, 8
    cmd = [VLLM_BIN, "bench", "serve", "--backend", backend, "--endpoint", endpoint, "--base-url", server.url,
           "--model", "tiny", "--tokenizer", resolve_model("tiny").path, "--dataset-name", "random",
           "--random-input-len", "32", "--random-output-len", str(out_len), "--num-prompts", str(n),
           "--request-rate", "4", "--max-concurrency", "3", "--ignore-eos", "--goodput", "ttft:60000", "tpot:60000"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(SHIM),
               VLLM_NO_USAGE_STATS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert _field(out, "Successful requests") == n
    assert _field(out, "Failed requests") == 0
    assert _field(out, "Total generated tokens") == n * out_len
    assert _field(out, "Request goodput (req/s)") > 0
