"""Coordinator throughput benchmark: ``python -m bench.coordinator``.

Starts ``python -m ascendra.server --fake-model`` (workers emit tokens without a model, so
the coordinator is the bottleneck) and measures two things:

* streamed tokens/s: many concurrent streaming requests with ``ignore_eos``; tokens are
  counted from each stream's usage chunk, the clock runs from first request to last [DONE];
* admitted requests/s: a closed loop of short requests (``max_tokens`` 1) at fixed
  concurrency; counts completed requests per second.

The last line printed is one JSON object with ``tokens_per_s`` and ``requests_per_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp

from .server_process import free_port


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "ascendra.server", "--port", str(port), "--fake-model",
        "--model", args.model, "--num-instances", str(args.num_instances),
        "--max-num-seqs", str(args.max_num_seqs), "--fake-step-time", str(args.fake_step_time),
        "--max-waiting", "100000", "--log-level", "warning",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ASCENDRA_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Ascendra serving"):
            return proc
    raise SystemExit(f"server exited with code {proc.wait()} before serving")


async def stream_one(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    body = {
        "prompt": [1000 + i for i in range(16)], "max_tokens": max_tokens, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
    }
    tail = b""
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_any():
            tail = (tail + chunk)[-512:]  # the usage chunk sits just before [DONE]
    i = tail.rfind(b'"completion_tokens":')
    if i < 0 or not tail.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream ended without usage: {tail[-200:]!r}")
    return int(tail[i + 20 :].split(b",", 1)[0])


async def bench_tokens(base: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, int, float]:
    url = base + "/v1/completions"
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        await stream_one(s, url, 4)  # warm-up
        queue = list(range(requests))
        total = 0

        async def client() -> None:
            nonlocal total
            while queue:
                queue.pop()
                n = await stream_one(s, url, max_tokens)  # not `total += await`: that would race
                total += n

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        dt = time.perf_counter() - t0
    return total / dt, total, dt


async def bench_requests(base: str, concurrency: int, requests: int) -> tuple[float, int, float]:
    url = base + "/v1/completions"
    body = json.dumps({"prompt": [1000, 1001, 1002, 1003], "max_tokens": 1, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        remaining = requests
        done = 0

        async def client() -> None:
            nonlocal remaining, done
            while remaining > 0:
                remaining -= 1
                async with s.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        dt = time.perf_counter() - t0
    return done / dt, done, dt


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.coordinator", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model whose tokenizer/config the fake workers use")
    p.add_argument("--num-instances", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--fake-step-time", type=float, default=0.01,
                   help="seconds per fake worker step: at 10 ms each stream gets one token per SSE event, "
                        "like a real deployment (and the workers stay off the coordinator's CPU)")
    p.add_argument("--stream-concurrency", type=int, default=512)
    p.add_argument("--stream-requests", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--request-concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--url", default=None, help="benchmark an already running server instead of starting one")
    args = p.parse_args()

    proc = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        port = free_port()
        proc = start_server(args, port)
        base = f"http://127.0.0.1:{port}"
    try:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        tps, ntok, dt = run(bench_tokens(base, args.stream_concurrency, args.stream_requests, args.max_tokens))
        print(f"streaming: {ntok} tokens in {dt:.2f}s over {args.stream_requests} requests "
              f"(concurrency {args.stream_concurrency}): {tps:,.0f} tokens/s", flush=True)
        rps, nreq, dt2 = run(bench_requests(base, args.request_concurrency, args.requests))
        print(f"requests: {nreq} completed in {dt2:.2f}s (concurrency {args.request_concurrency}): "
              f"{rps:,.0f} requests/s", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps({"tokens_per_s": round(tps, 1), "requests_per_s": round(rps, 1),
                      "tokens": ntok, "requests": nreq, "num_instances": args.num_instances,
                      "fake_step_time": args.fake_step_time}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
