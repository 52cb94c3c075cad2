"""A server subprocess for benchmarks (start, wait until healthy, stop with its workers) and
the small blocking HTTP helpers that go with it."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import promtext


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess in its own process group (so its workers stop with it)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n$ {shlex.join(self.cmd)}\n".encode())
        log.flush()
        env = dict(os.environ, HF_HUB_OFFLINE="1", **self.env)
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode} before it was "
                                   f"healthy; last log lines ({self.log_path}):\n{self.log_tail()}")
            if http_get(self.base_url + "/health", 2.0)[0] == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout_s:g}s; last log lines:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_get(url: str, timeout_s: float) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError, ValueError):
        return None, ""


def wait_idle(base_url: str, timeout_s: float) -> bool:
    """Wait until the server reports nothing running or queued (so one point's stragglers do
    not load the next). True when idle or when it exposes no such gauges."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, text = http_get(base_url + "/metrics", 5.0)
        if status != 200:
            return True
        m = promtext.parse(text)
        keys = [k for k in m if k.endswith(("num_requests_running", "num_requests_waiting",
                                            "coordinator_requests_inflight"))]
        if not keys or all(m[k] == 0 for k in keys):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
