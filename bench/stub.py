"""A tiny fake OpenAI completions server for testing the benchmark client without a model.

`python -m bench.stub --port 8123` serves /v1/models, /health, /metrics and streaming
/v1/completions. Time to first token grows with the prompt and the time between tokens
with the number of requests running, so attainment falls as the rate rises (enough to
exercise bench.compare). Faults can be injected per prompt length, so a trace with chosen
ContextTokens picks which requests misbehave.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

FAULTS = ("http500", "error_event", "no_done", "short", "hang", "drop")


@dataclass
class StubConfig:
    model: str = "stub-model"
    ttft_s: float = 0.005  # fixed part of time to first token
    prefill_s_per_token: float = 0.00002
    tbt_s: float = 0.004
    batch_knee: int = 8  # TBT starts growing once more than this many requests run
    reject_token_ids: bool = False  # 400 for list[int] prompts, like a text-only server
    reject_extensions: bool = False  # 400 for ignore_eos/min_tokens
    return_token_ids: bool = True  # honour the return_token_ids extension
    usage: bool = True
    eos_after: int | None = None  # without ignore_eos, stop after this many tokens
    faults: dict[int, str] = field(default_factory=dict)  # prompt length -> fault kind
    vocab: int = 32000


class StubServer:
    def __init__(self, cfg: StubConfig) -> None:
        self.cfg = cfg
        self.running = 0
        self.gen_tokens = 0
        self.prompt_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.requests = 0
        self.received: list[tuple[float, dict]] = []  # (monotonic arrival, body)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.cfg.model, "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            f"ascendra:generation_tokens_total {self.gen_tokens}\n"
            f"ascendra:prompt_tokens_total {self.prompt_tokens}\n"
            f"ascendra:time_to_first_token_seconds_sum {self.ttft_sum}\n"
            f"ascendra:time_to_first_token_seconds_count {self.ttft_count}\n"
            f"ascendra:num_requests_running {self.running}\n"
            f"ascendra:num_requests_waiting 0\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        body = await request.json()
        self.received.append((arrival, body))
        cfg = self.cfg
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if cfg.reject_token_ids:
                return web.json_response({"error": {"message": "prompt must be a string"}}, status=400)
            n_prompt = len(prompt)
        else:
            n_prompt = len(str(prompt).split())
        if cfg.reject_extensions and ("ignore_eos" in body or "min_tokens" in body):
            return web.json_response({"error": {"message": "unknown field ignore_eos"}}, status=400)
        fault = cfg.faults.get(n_prompt)
        if fault == "http500":
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        max_tokens = int(body.get("max_tokens", 16))
        n_out = max_tokens
        if not body.get("ignore_eos") and cfg.eos_after is not None:
            n_out = min(n_out, cfg.eos_after)
        if fault == "short":
            n_out = max(1, max_tokens // 2)
        want_ids = bool(body.get("return_token_ids")) and cfg.return_token_ids
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "text": "x" * n_out, "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out}})

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.requests += 1
        self.running += 1
        self.prompt_tokens += n_prompt
        try:
            await asyncio.sleep(cfg.ttft_s + cfg.prefill_s_per_token * n_prompt)
            if fault == "hang":
                await asyncio.sleep(3600)
            for i in range(n_out):
                if i:
                    await asyncio.sleep(cfg.tbt_s * max(1.0, self.running / cfg.batch_knee))
                if i == 0:
                    self.ttft_sum += time.monotonic() - arrival
                    self.ttft_count += 1
                if fault == "drop" and i == n_out // 2:
                    request.transport.close()  # the server "dies" mid-stream
                    return resp
                if fault == "error_event" and i == n_out // 2:
                    await self._send(resp, {"error": {"message": "injected error", "code": 500}})
                    break
                tok = (n_prompt * 31 + i * 7) % cfg.vocab  # deterministic "greedy" output
                choice = {"index": 0, "text": f" t{tok}",
                          "finish_reason": ("length" if n_out == max_tokens else "stop") if i == n_out - 1 else None}
                if want_ids:
                    choice["token_ids"] = [tok]
                await self._send(resp, {"id": "cmpl-stub", "object": "text_completion", "choices": [choice]})
                self.gen_tokens += 1
            if cfg.usage and (body.get("stream_options") or {}).get("include_usage"):
                await self._send(resp, {"id": "cmpl-stub", "choices": [],
                                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                                  "total_tokens": n_prompt + n_out}})
            if fault != "no_done":
                await resp.write(b"data: [DONE]\n\n")
        finally:
            self.running -= 1
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, obj: dict) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())


async def start(cfg: StubConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, StubServer, int]:
    """Start in the current event loop; returns (runner, server, bound port)."""
    server = StubServer(cfg)
    runner = web.AppRunner(server.app(), handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, server, bound


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stub")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--tbt", type=float, default=0.004)
    p.add_argument("--ttft", type=float, default=0.005)
    p.add_argument("--batch-knee", type=int, default=8)
    p.add_argument("--reject-token-ids", action="store_true")
    p.add_argument("--fault", action="append", default=[], metavar="PROMPT_LEN=KIND",
                   help=f"inject a fault for prompts of this length; kinds: {', '.join(FAULTS)}")
    # Accept (and ignore) our server's flags so bench.compare can drive the stub.
    a, _ = p.parse_known_args()
    faults = {int(k): v for k, v in (f.split("=", 1) for f in a.fault)}
    cfg = StubConfig(tbt_s=a.tbt, ttft_s=a.ttft, batch_knee=a.batch_knee,
                     reject_token_ids=a.reject_token_ids, faults=faults)
    print(f"stub server on http://{a.host}:{a.port}", flush=True)
    web.run_app(StubServer(cfg).app(), host=a.host, port=a.port, print=None)


if __name__ == "__main__":
    main()
