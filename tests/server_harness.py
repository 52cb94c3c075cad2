"""Run ``python -m ascendra.server`` as a subprocess for tests, and talk to it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"^Ascendra serving .* on (http://\S+) ")


class ServerProcess:
    """The server on a free port (``--port 0``); its log is kept for failure messages."""

    def __init__(self, *args: str, startup_timeout: float = 600.0) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if "--policy" not in args and "--default-policy" not in args:
            # These tests were written against the round-robin baseline; the default policy
            # (ascendra with >= 2 instances) has tests of its own.
            args = ("--policy", "vllm", *args)
        args = tuple(a for a in args if a != "--default-policy")
        cmd = [sys.executable, "-m", "ascendra.server", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(startup_timeout) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log())

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = READY.match(line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # exited

    def log(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])

    # ---- HTTP helpers (blocking, stdlib only)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 300.0) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        status, _, data = self.request("POST", path, body, raw)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data

    def health(self) -> tuple[int, dict]:
        status, _, data = self.request("GET", "/health")
        return status, json.loads(data)

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[2].decode()

    def worker_pids(self) -> list[int]:
        """The workers' pids in instance order, from /proc (/health does not expose them)."""
        return worker_pids(self.proc.pid)

    # ---- lifecycle

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def worker_pids(server_pid: int) -> list[int]:
    found: dict[int, int] = {}
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except FileNotFoundError:
            continue
        if "workers" in argv and "--worker-id" in argv:
            found[int(argv[argv.index("--worker-id") + 1])] = pid
    return [found[i] for i in sorted(found)]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text (parsed by prometheus_client) -> {'name{labels}': value}, labels in the
    order the server wrote them."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def sse_events(raw: bytes) -> list[Any]:
    """Decode an SSE body into JSON objects, with the string "[DONE]" for the end marker."""
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return events
