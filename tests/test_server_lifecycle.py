"""Server lifecycle: a worker dying, the bounded waiting queue, and SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.helpers import pid_alive, wait_until
from tests.server_harness import ServerProcess, parse_metrics, sse_events

pytestmark = pytest.mark.e2e


def _segments_of(pids):
    return [p for pid in pids for p in glob.glob(f"/dev/shm/ascendra_{pid}_*")]


async def _open_stream(session, url, body, path="/v1/completions"):
    """POST a streaming request and read until its first text token arrives."""
    resp = await session.post(url + path, json=dict(body, stream=True))
    assert resp.status == 200, await resp.text()
    seen = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            seen.append(line)
            if b'"text":' in line:
                break
    return resp, seen


async def _finish_stream(resp, seen):
    raw = b"\n\n".join(seen) + b"\n\n" + await resp.read()
    resp.release()
    return sse_events(raw)


# ---------------------------------------------------------------- a worker dies


@pytest.fixture(scope="module")
def two_workers():
    srv = ServerProcess("--model", "tiny", "--num-instances", "2", "--max-model-len", "1024")
    yield srv
    srv.stop()


async def test_worker_death_fails_its_requests_and_others_continue(two_workers):
    srv = two_workers
    pids = srv.worker_pids()
    body = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        # Opened one after another on a fresh server, round robin puts streams 0, 2 on worker 0.
        streams = [await _open_stream(s, srv.url, body) for _ in range(4)]
        assert [w["num_requests"] for w in srv.health()[1]["workers"]] == [2, 2]
        blocking = asyncio.ensure_future(s.post(srv.url + "/v1/completions",
                                                json={"prompt": "x", "max_tokens": 400, "ignore_eos": True}))
        for _ in range(1200):
            if srv.health()[1]["workers"][0]["num_requests"] == 3:
                break
            await asyncio.sleep(0.05)
        assert srv.health()[1]["workers"][0]["num_requests"] == 3

        os.kill(pids[0], signal.SIGKILL)

        results = [await _finish_stream(r, seen) for r, seen in streams]
        resp = await blocking
        assert resp.status == 503
        err = (await resp.json())["error"]
        assert "worker 0" in err["message"]
        resp.release()

    for i, events in enumerate(results):
        assert events[-1] == "[DONE]"
        if i % 2 == 0:  # worker 0: an error event, then [DONE]
            assert "error" in events[-2], events[-3:]
            assert "worker 0" in events[-2]["error"]["message"]
        else:  # worker 1: untouched, runs to the end
            assert events[-2]["usage"]["completion_tokens"] == 400
            assert events[-3]["choices"][0]["finish_reason"] == "length"

    status, health = srv.health()
    assert status == 503
    assert [w["alive"] for w in health["workers"]] == [False, True]
    # The survivor keeps serving every new request.
    for _ in range(3):
        status, res = srv.post("/v1/completions", {"prompt": "still here", "max_tokens": 3, "ignore_eos": True})
        assert status == 200 and res["usage"]["completion_tokens"] == 3
    m = parse_metrics(srv.metrics())
    assert m['ascendra:worker_up{instance="0",role="mixed"}'] == 0
    assert m['ascendra:worker_up{instance="1",role="mixed"}'] == 1
    # The dead worker's last step showed its KV in use; a dead worker holds nothing.
    assert m['ascendra:kv_cache_usage_perc{instance="0"}'] == 0
    assert m['ascendra:num_requests_running{instance="0"}'] == 0
    assert m['ascendra:request_success_total{finished_reason="error"}'] >= 3
    assert wait_until(lambda: not _segments_of(pids[:1]), timeout=30), _segments_of(pids[:1])

    # SIGTERM with one worker already gone still ends cleanly.
    assert srv.stop() == 0
    assert not any(pid_alive(p) for p in pids)
    assert not _segments_of(pids)


# ---------------------------------------------------------------- queue bound, then SIGTERM


@pytest.fixture(scope="module")
def one_slot():
    srv = ServerProcess("--model", "tiny", "--num-instances", "1", "--max-num-seqs", "1", "--max-waiting", "1",
                        "--max-model-len", "2048", "--num-blocks", "100", "--drain-timeout", "1")
    yield srv
    srv.stop()


async def test_queue_full_then_sigterm_ends_everything(one_slot):
    srv = one_slot
    pids = srv.worker_pids()
    assert _segments_of(pids), "CPU workers keep their KV pool in shared memory"
    # 100 blocks x 16 tokens: a request that could never fit is refused up front.
    status, res = srv.post("/v1/completions", {"prompt": "x", "max_tokens": 1700})
    assert status == 400 and res["error"]["param"] == "max_tokens" and "KV cache" in res["error"]["message"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        # A occupies the only batch slot; B waits for its first token; C finds the queue full.
        a = await _open_stream(s, srv.url, {"prompt": "A", "max_tokens": 1500, "ignore_eos": True})
        b = await s.post(srv.url + "/v1/completions", json={"prompt": "B", "max_tokens": 4, "stream": True})
        assert b.status == 200
        c = await s.post(srv.url + "/v1/completions", json={"prompt": "C", "max_tokens": 4})
        assert c.status == 429
        assert c.headers.get("Retry-After") == "1"
        err = (await c.json())["error"]
        assert err["type"] == "rate_limit_error" and "max-waiting" in err["message"]
        c.release()
        m = parse_metrics(srv.metrics())
        assert m['ascendra:request_rejected_total{reason="queue_full"}'] == 1
        assert m["ascendra:coordinator_requests_waiting"] == 1
        assert srv.health()[0] == 200

        srv.proc.send_signal(signal.SIGTERM)
        a_events = await _finish_stream(*a)
        b_events = sse_events(await b.read())
    # In-flight streams end properly (finished or told the server is going away), then [DONE].
    assert a_events[-1] == "[DONE]" and b_events[-1] == "[DONE]"
    for events in (a_events, b_events):
        last = events[-2]
        assert "error" in last or last["choices"][0]["finish_reason"] is not None
    assert srv.proc.wait(60) == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)
    assert not _segments_of(pids)
    assert "shut down" in srv.log()


def test_sigint_also_shuts_down_cleanly():
    srv = ServerProcess("--model", "tiny", "--num-instances", "2", "--fake-model")
    pids = srv.worker_pids()
    status, res = srv.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "ignore_eos": True})
    assert status == 200
    assert srv.stop(signal.SIGINT) == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)
    assert not _segments_of(pids)


def test_unwritable_step_log_is_refused_at_startup(tmp_path):
    bad = tmp_path / "missing-dir" / "steps.jsonl"
    res = subprocess.run([sys.executable, "-m", "ascendra.server", "--model", "tiny", "--fake-model", "--port", "0",
                          "--step-log", str(bad)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 2
    assert "--step-log" in res.stderr and str(bad) in res.stderr
