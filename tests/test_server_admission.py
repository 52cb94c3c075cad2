"""--admission on a real server: a request the policy predicts will miss its TTFT gets 429 at
arrival (counted as rejected and missed); one with a reachable objective is served. The policy's
and the workers' hopeless counts are exported."""

import pytest

from tests.server_harness import ServerProcess, parse_metrics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--model", "tiny", "--num-instances", "2", "--policy", "ascendra", "--admission",
                        "--chunk-size", "32", "--num-blocks", "256")
    yield srv
    srv.stop()


def test_admission_refuses_what_cannot_start_in_time_and_serves_the_rest(server):
    body = {"model": "tiny", "prompt": list(range(100, 400)), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    # One microsecond to the first token: no instance can prefill 300 tokens that fast.
    status, out = server.post("/v1/completions", {**body, "ttft_slo_ms": 0.001})
    assert status == 429, out
    assert "TTFT objective" in out["error"]["message"]
    status, out = server.post("/v1/completions", {**body, "ttft_slo_ms": 600_000})
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 4
    mt = parse_metrics(server.metrics())
    assert mt['ascendra:request_rejected_total{reason="would_miss"}'] == 1
    assert mt['ascendra:slo_requests_total{result="missed_ttft"}'] == 1
    assert mt['ascendra:request_success_total{finished_reason="length"}'] == 1
    # Both hopeless series are exported (the served request was never judged hopeless).
    assert mt['ascendra:requests_hopeless_total{judged_by="policy"}'] == 0
    assert mt['ascendra:requests_hopeless_total{judged_by="scheduler"}'] == 0
