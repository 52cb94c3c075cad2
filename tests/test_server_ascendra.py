"""The ascendra policy end to end: escalated requests keep their greedy output, blocks come back."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from tests.helpers import wait_until
from tests.runtime_utils import greedy, make_engine, run_all
from tests.server_harness import ServerProcess

pytestmark = pytest.mark.e2e

PROMPTS = [list(range(1000 + 7 * i, 1000 + 7 * i + n)) for i, n in enumerate((20, 90, 200, 45, 130, 12))]
N_OUT = 24


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--model", "tiny", "--num-instances", "2", "--policy", "ascendra",
                        "--force-escalation-after", "2", "--chunk-size", "32", "--num-blocks", "256",
                        "--dtype", "float32")  # compared with the fp32 in-process engine
    yield srv
    srv.stop()


def test_escalated_requests_keep_greedy_output(server, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    want, _ = run_all(make_engine(tiny_model, num_blocks=256), PROMPTS, greedy(N_OUT, ignore_eos=True))

    def complete(p):
        return server.post("/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": N_OUT,
                                               "temperature": 0, "ignore_eos": True})

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(complete, PROMPTS))
    for (status, body), ids in zip(results, want):
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == N_OUT
        assert body["choices"][0]["text"] == tok.decode(ids)
    text = server.metrics()
    assert metric(text, 'ascendra:escalations_total{stage="decode"}') >= 1
    assert metric(text, "ascendra:migrated_blocks_total") > 0
    assert metric(text, "ascendra:migration_downtime_seconds_count") >= 1
    # Both pools empty again once the sources have released their frozen copies.
    assert wait_until(lambda: metric(server.metrics(), "ascendra:kv_cache_usage_perc") == 0.0, timeout=20)
    status, health = server.health()
    assert status == 200 and all(w["num_requests"] == 0 for w in health["workers"])
    assert re.search(r"escalat", server.log(200))
