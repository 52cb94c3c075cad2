"""A bounded soak of our server: mixed streaming, disconnects and bad input, interleaved.

    python -m bench.soak --duration 600 --model tiny --num-instances 2

Starts ``python -m ascendra.server``, keeps ``--concurrency`` clients busy for ``--duration``
seconds, each request drawn at random: a stream read to the end, a non-streaming request,
a stream dropped after its first tokens, or a bad request (oversized integers, invalid
UTF-8, deep JSON, wrong Content-Type, a refused field, an oversized body) that must get a 4xx.
Then it waits for the server to go idle, stops it with SIGINT and checks what is left.

The last line printed is JSON: requests by kind, failures by reason, p99 TTFT per minute,
coordinator and worker RSS at start and end, KV usage at idle (must be 0), and leaked worker
processes, shared-memory segments and socket directories (must be none).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from . import promtext
from .server_process import ServerProcess, free_port, http_get

# Each bad request and the status it must get.
BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int]] = [
    ("seed_overflow", b'{"prompt": "x", "seed": 1180591620717411303424}', {}, 400),
    ("top_k_overflow", b'{"prompt": "x", "top_k": 1180591620717411303424}', {}, 400),
    ("stop_id_overflow", b'{"prompt": "x", "stop_token_ids": [1180591620717411303424]}', {}, 400),
    ("stop_id_vocab", b'{"prompt": "x", "stop_token_ids": [10000000], "min_tokens": 3}', {}, 400),
    ("tiny_temperature", b'{"prompt": "x", "temperature": 1e-38}', {}, 400),
    ("invalid_utf8", b'{"prompt": "caf\xc3\x28"}', {}, 400),
    ("deep_json", b'{"prompt": "x", "logprobs": ' + b"[" * 20000 + b"]" * 20000 + b"}", {}, 400),
    ("no_content_type", b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415),
    ("unsupported_field", b'{"prompt": "x", "response_format": {"type": "json_object"}}', {}, 400),
    ("too_many_stops", json.dumps({"prompt": "x", "stop": [f"s{i}" for i in range(100)]}).encode(), {}, 400),
    ("oversized_body", json.dumps({"prompt": "a " * 400_000}).encode(), {}, 413),
    ("request_template", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                     "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}).encode(), {}, 400),
]
KINDS = (("stream", 0.5), ("plain", 0.2), ("disconnect", 0.15), ("bad", 0.15))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--model", default="tiny")
    p.add_argument("--num-instances", type=int, default=2)
    p.add_argument("--policy", default="vllm")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=8, help="clients sending back to back")
    p.add_argument("--max-tokens", type=int, default=48, help="longest output of a request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--server-args", default="", help="extra flags for the server")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    return p


# ------------------------------------------------------------------ process facts


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def worker_pids(server_pid: int) -> list[int]:
    """The server's worker processes (direct children running ``-m workers``)."""
    try:
        with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return []
    out = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"workers" in f.read().split(b"\0"):
                    out.append(pid)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(0.99 * len(v)))]


# ------------------------------------------------------------------ load


class Soak:
    def __init__(self, args: argparse.Namespace, base_url: str, pids: list[int]) -> None:
        self.a = args
        self.url = base_url
        self.pids = pids  # coordinator first, then workers
        self.rss_per_minute: list[list[float | None]] = []
        self.rng = random.Random(args.seed)
        self.kinds = Counter()
        self.failures = Counter()
        self.ttft_by_minute: dict[int, list[float]] = {}
        self.start = 0.0

    def _fail(self, reason: str) -> None:
        self.failures[reason] += 1

    async def one(self, s: aiohttp.ClientSession) -> None:
        kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        self.kinds[kind] += 1
        max_tokens = self.rng.randint(4, self.a.max_tokens)
        prompt = " ".join(self.rng.choice(["alpha", "beta", "gamma", "delta", "soak"])
                          for _ in range(self.rng.randint(4, 200)))
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        t0 = time.monotonic()
        if kind == "bad":
            name, raw, headers, want = self.rng.choice(BAD_REQUESTS)
            h = {"Content-Type": "application/json", **headers}
            async with s.post(self.url + "/v1/completions", data=raw, headers=h) as r:
                text = await r.text()
                if r.status != want:
                    self._fail(f"bad_{name}_got_{r.status}")
                elif "Traceback" in text or "Error(" in text:
                    self._fail(f"bad_{name}_exception_text")
            return
        if kind == "plain":
            async with s.post(self.url + "/v1/completions", json=body) as r:
                res = await r.json(content_type=None)
                if r.status != 200:
                    self._fail(f"plain_http_{r.status}")
                elif res["usage"]["completion_tokens"] != max_tokens:
                    self._fail("plain_short_output")
            return
        body["stream"] = True
        async with s.post(self.url + "/v1/completions", json=body) as r:
            if r.status != 200:
                self._fail(f"{kind}_http_{r.status}")
                return
            first = None
            done = False
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                if first is None and b'"text":' in line:
                    first = time.monotonic()
                    minute = int((first - self.start) // 60)
                    self.ttft_by_minute.setdefault(minute, []).append(first - t0)
                    if kind == "disconnect":
                        r.close()  # drop the connection mid-stream
                        return
                if line.startswith(b'data: {"error"'):  # an error event (token text may say "error")
                    self._fail("stream_error_event")
                if line.strip() == b"data: [DONE]":
                    done = True
            if not done:
                self._fail("stream_without_done")

    async def client(self, s: aiohttp.ClientSession, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.one(s), timeout=120)
            except TimeoutError:
                self._fail("timeout")
            except aiohttp.ClientError as e:
                self._fail(f"client_{type(e).__name__}")

    async def sample_rss(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(60.0, max(0.0, deadline - time.monotonic())))
            self.rss_per_minute.append([rss_mb(p) for p in self.pids])

    async def run(self) -> None:
        self.start = time.monotonic()
        deadline = self.start + self.a.duration
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=180)) as s:
            await asyncio.gather(self.sample_rss(deadline),
                                 *(self.client(s, deadline) for _ in range(self.a.concurrency)))


def metrics(base_url: str) -> dict[str, float]:
    status, text = http_get(base_url + "/metrics", 10.0)
    return promtext.parse(text) if status == 200 else {}


def wait_idle(base_url: str, timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(base_url)
        busy = [k for k, v in m.items() if v and k.startswith(("ascendra:num_requests_running",
                                                                  "ascendra:num_requests_waiting",
                                                                  "ascendra:coordinator_requests_inflight"))]
        if not busy or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="ascendra-soak-")) / "server.log"
    cmd = [sys.executable, "-m", "ascendra.server", "--host", "127.0.0.1", "--port", str(port), "--model", a.model,
           "--num-instances", str(a.num_instances), "--policy", a.policy, "--max-model-len", str(a.max_model_len),
           *a.server_args.split()]
    srv = ServerProcess(cmd, port, log_path)
    srv.start()
    try:
        srv.wait_healthy(a.startup_timeout)
        assert srv.proc is not None
        server_pid = srv.proc.pid
        workers = worker_pids(server_pid)
        rss_start = {"coordinator_mb": rss_mb(server_pid), "workers_mb": [rss_mb(p) for p in workers]}
        soak = Soak(a, srv.base_url, [server_pid, *workers])
        print(f"soaking {srv.base_url} for {a.duration:g}s with {a.concurrency} clients (log {log_path})", flush=True)
        asyncio.run(soak.run())
        m = wait_idle(srv.base_url, 60.0)
        rss_end = {"coordinator_mb": rss_mb(server_pid), "workers_mb": [rss_mb(p) for p in workers]}
        kv_idle = {k: v for k, v in m.items() if k.startswith("ascendra:kv_cache_usage_perc")}
        disconnects = m.get("ascendra:client_disconnects_total")
    finally:
        srv.stop()
    shm = [p for pid in workers for p in glob.glob(f"/dev/shm/ascendra_{pid}_*")]
    result = {
        "duration_s": a.duration,
        "requests": sum(soak.kinds.values()),
        "requests_by_kind": dict(soak.kinds),
        "failures": sum(soak.failures.values()),
        "failures_by_reason": dict(soak.failures),
        "p99_ttft_s_per_minute": [round(p99(soak.ttft_by_minute[k]) or 0.0, 4) for k in sorted(soak.ttft_by_minute)],
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_mb_per_minute": soak.rss_per_minute,  # [coordinator, workers...] at the end of each minute
        "kv_usage_at_idle": kv_idle,
        "kv_idle_zero": all(v == 0 for v in kv_idle.values()),
        "client_disconnects_counted": disconnects,
        "server_exit_code": srv.proc.returncode if srv.proc is not None else None,
        "leaked_processes": [p for p in workers if alive(p)],
        "leaked_shm": shm,
        "leaked_socket_dirs": glob.glob(os.path.join(tempfile.gettempdir(), f"ascendra-coord-{server_pid}-*")),
        "errors_in_log": sum(1 for line in log_path.read_text(errors="replace").splitlines()
                             if " ERROR " in line or "Traceback" in line),
    }
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    ok = (not result["failures"] and result["kv_idle_zero"] and not result["leaked_processes"]
          and not result["leaked_shm"] and not result["leaked_socket_dirs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
