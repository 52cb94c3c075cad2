"""A fatal device error ends the worker, and the coordinator marks it down (CPU, injected)."""

from __future__ import annotations

import pytest

from tests.helpers import pid_alive, wait_until
from tests.server_harness import ServerProcess

pytestmark = pytest.mark.e2e


def test_fatal_device_error_marks_the_worker_down(monkeypatch):
    # The worker raises the error CUDA gives after an illegal memory access, on any request.
    monkeypatch.setenv("ASCENDRA_TEST_FAIL_FATAL", "*")
    srv = ServerProcess("--model", "tiny", "--num-instances", "1", "--num-blocks", "64")
    try:
        pid = srv.worker_pids()[0]
        status, body = srv.post("/v1/completions", {"prompt": "hello", "max_tokens": 4})
        assert status == 503, body
        message = body["error"]["message"]
        assert "worker 0" in message and "illegal memory access" in message
        assert "fatal device error" in message
        assert "Traceback" not in message and "Error(" not in message  # no Python repr
        assert wait_until(lambda: not pid_alive(pid), timeout=30)
        status, health = srv.health()
        assert status == 503 and [w["alive"] for w in health["workers"]] == [False]
        # No worker left: new requests are refused at once, not hung.
        status, body = srv.post("/v1/completions", {"prompt": "again", "max_tokens": 2})
        assert status == 503, body
    finally:
        srv.stop()
