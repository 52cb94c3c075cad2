"""Streaming load-generating client for any OpenAI-compatible /v1/completions server.

Every request streams (SSE) and every chunk is timestamped on arrival. Nothing is dropped
silently: HTTP errors, error events, streams without [DONE], short outputs when ignore_eos
was sent, timeouts and connection errors all become failed results with a reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import aiohttp

from ascendra.config import default

from .metrics import RequestResult
from .workloads import RequestSpec, prompt_text, prompt_token_ids


class FatalError(Exception):
    """The run cannot start (server unreachable, no model, every probe rejected)."""


@dataclass
class ServerCaps:
    """What the server accepted when probed (or what the user asserted)."""

    prompt_mode: str = "token_ids"  # token_ids | text
    extensions: bool = True  # ignore_eos + min_tokens accepted
    token_ids: bool = False  # return_token_ids honoured (output ids in chunks)
    usage: bool = True  # stream_options.include_usage honoured
    notes: list[str] = field(default_factory=list)


@dataclass
class ClientConfig:
    base_url: str
    model: str | None = None
    timeout_s: float = 300.0  # whole-request limit
    connect_timeout_s: float = 10.0
    temperature: float = 0.0
    seed: int = 0
    send_slo: bool = False
    ttft_slo_s: float = default("ttft_slo")
    tbt_slo_s: float = default("tbt_slo")
    record_outputs: bool = False
    max_concurrency: int | None = None
    abort_after: int = 5  # consecutive connection failures that end the run
    prompt_mode: str = "auto"  # auto | token_ids | text
    extensions: bool = True  # used when prompt_mode is not auto
    extra_body: dict = field(default_factory=dict)

    @property
    def root(self) -> str:
        # Accept the OpenAI-client style ".../v1" as well as the bare server address.
        b = self.base_url.rstrip("/")
        return b[:-3] if b.endswith("/v1") else b

    @property
    def url(self) -> str:
        return self.root + "/v1/completions"


@dataclass
class RunState:
    """Shared with the caller so an interrupted run still yields its partial results."""

    results: list[RequestResult] = field(default_factory=list)
    t0: float = 0.0  # perf_counter() at the start of the run
    caps: ServerCaps | None = None
    model: str | None = None
    abort_reason: str | None = None
    probe_requests: int = 0
    probe_output_tokens: int = 0

    def finalize(self, in_flight_reason: str = "interrupted") -> None:
        """Give every unfinished request a failure reason."""
        for r in self.results:
            if r.success or r.error:
                continue
            if r.send_s is None:
                r.error = f"not sent: {self.abort_reason or 'run ended first'}"
            else:
                r.error = in_flight_reason

    def duration_s(self) -> float:
        sends = [r.send_s for r in self.results if r.send_s is not None]
        ends = [r.end_s for r in self.results if r.end_s is not None]
        return max(ends) - min(sends) if sends and ends else 0.0


# ------------------------------------------------------------------ one request


class _ConnectFailure(Exception):
    pass


def _error_text(obj: object) -> str:
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(obj)


def apply_chunk(r: RequestResult, obj: dict, now: float, record: bool) -> str | None:
    """Fold one decoded SSE payload into r; returns an error text for error events."""
    if "error" in obj and not obj.get("choices"):
        return _error_text(obj)
    usage = obj.get("usage")
    if usage:
        r.n_out = int(usage.get("completion_tokens") or 0)
        if usage.get("prompt_tokens") is not None:
            r.prompt_tokens = int(usage["prompt_tokens"])
    for choice in obj.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue
        text = choice.get("text")
        if text is None:  # chat-style delta
            text = (choice.get("delta") or {}).get("content") or ""
        ids = choice.get("token_ids")
        finish = choice.get("finish_reason")
        # A chunk with no text and no finish reason still marks a generated token (its
        # bytes may be an incomplete character); a bare finish chunk does not.
        ntok = len(ids) if ids else (1 if text or finish is None else 0)
        if ntok:
            r.token_times_s.append(now)
            r.chunk_tokens.append(ntok)
        if finish:
            r.finish_reason = finish
        if record:
            r.output_text = (r.output_text or "") + text
            if ids:
                r.output_ids = (r.output_ids or []) + list(ids)
    return None


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, r: RequestResult,
                     t0: float, timeout_s: float, require_full: bool, record: bool) -> None:
    """Send one streaming request and fill r. Raises _ConnectFailure (after filling r) when
    the server could not be reached or dropped the connection, so the caller can count it."""
    r.send_s = time.perf_counter() - t0
    usage_seen = False
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300].replace("\n", " ")
                    r.error = f"http {resp.status}: {text}"
                    return
                ctype = resp.headers.get("Content-Type", "")
                if "text/event-stream" not in ctype:
                    # A server that ignored stream=true: one chunk, TTFT == E2E.
                    obj = await resp.json(content_type=None)
                    now = time.perf_counter() - t0
                    err = apply_chunk(r, obj, now, record)
                    r.error = f"error event: {err}" if err else None
                    done = err is None
                    usage_seen = bool(obj.get("usage"))
                else:
                    done = False
                    event = ""
                    async for raw in resp.content:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        if not line:
                            event = ""
                            continue
                        if line.startswith("event:"):
                            event = line[6:].strip()
                            continue
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            done = True
                            break
                        now = time.perf_counter() - t0
                        try:
                            obj = json.loads(payload)
                        except json.JSONDecodeError:
                            r.error = f"bad chunk: {payload[:200]}"
                            break
                        err = apply_chunk(r, obj, now, record) if isinstance(obj, dict) else None
                        usage_seen = usage_seen or bool(obj.get("usage"))
                        if err is not None or event == "error":
                            r.error = f"error event: {err or payload[:200]}"
                            break
                r.end_s = time.perf_counter() - t0
                if r.error:
                    return
                if not done:
                    r.error = f"no [DONE]: stream ended after {len(r.token_times_s)} chunks"
                    raise _ConnectFailure(r.error)
                if not usage_seen:
                    r.n_out = sum(r.chunk_tokens)
                if require_full and r.n_out < r.output_len:
                    r.error = (f"short output: {r.n_out} of {r.output_len} tokens "
                               f"(finish_reason={r.finish_reason})")
                    return
                if r.n_out == 0:
                    r.error = "empty output: no tokens"
                    return
                r.success = True
    except TimeoutError:
        r.error = f"timeout: no complete response after {timeout_s:g}s ({len(r.token_times_s)} chunks)"
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as e:
        # ClientConnectionError covers refused connects, a server that went away mid-response
        # and a reset socket (ClientOSError), all of which mean the server is unreachable.
        r.error = f"connection error: {type(e).__name__}: {e}"
        raise _ConnectFailure(r.error) from e
    except aiohttp.ClientError as e:
        r.error = f"client error: {type(e).__name__}: {e}"
    finally:
        if r.end_s is None:
            r.end_s = time.perf_counter() - t0


# ------------------------------------------------------------------ bodies and probing


def make_body(cfg: ClientConfig, caps: ServerCaps, model: str, index: int, prompt_len: int,
              output_len: int, ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> dict:
    if caps.prompt_mode == "token_ids":
        prompt: list[int] | str = prompt_token_ids(cfg.seed, index, prompt_len)
    else:
        prompt = prompt_text(cfg.seed, index, prompt_len)
    body: dict = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": cfg.temperature,
    }
    if caps.extensions:
        body["ignore_eos"] = True
        body["min_tokens"] = output_len
    if caps.token_ids:
        body["return_token_ids"] = True
    if cfg.temperature > 0:
        body["seed"] = cfg.seed * 100_003 + index  # reproducible sampling per request
    if cfg.send_slo:
        # The request's own class when the workload has SLO classes, else the run's objectives.
        body["ttft_slo_ms"] = (ttft_slo_s if ttft_slo_s is not None else cfg.ttft_slo_s) * 1000.0
        body["tbt_slo_ms"] = (tbt_slo_s if tbt_slo_s is not None else cfg.tbt_slo_s) * 1000.0
    body.update(cfg.extra_body)
    return body


async def fetch_models(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> list[str]:
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise FatalError(f"GET {url} returned HTTP {resp.status}")
                data = await resp.json(content_type=None)
    except FatalError:
        raise
    except TimeoutError as e:
        raise FatalError(f"cannot reach server at {base_url}: GET /v1/models timed out") from e
    except (aiohttp.ClientError, OSError, ValueError) as e:
        raise FatalError(f"cannot reach server at {base_url}: {type(e).__name__}: {e}") from e
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]


async def probe(session: aiohttp.ClientSession, cfg: ClientConfig, model: str,
                state: RunState) -> ServerCaps:
    """Find the most exact way this server takes prompts: token ids with ignore_eos and
    min_tokens first, plain text last. A 4xx moves on to the next way; anything else
    (5xx, connection error, timeout) means the server itself is not usable."""
    modes = ["token_ids", "text"] if cfg.prompt_mode == "auto" else [cfg.prompt_mode]
    rtis = [True, False] if cfg.record_outputs else [False]
    rejected: list[str] = []
    for mode in modes:
        for ext in ([True, False] if cfg.prompt_mode == "auto" else [cfg.extensions]):
            for rti in rtis:
                caps = ServerCaps(prompt_mode=mode, extensions=ext, token_ids=rti)
                body = make_body(cfg, caps, model, -1, 1, 2)
                body.pop("ttft_slo_ms", None)
                body.pop("tbt_slo_ms", None)
                r = RequestResult(index=-1, prompt_len=1, output_len=2, scheduled_s=0.0)
                state.probe_requests += 1
                try:
                    await stream_one(session, cfg.url, body, r, time.perf_counter(),
                                     min(cfg.timeout_s, 120.0), False, True)
                except _ConnectFailure:
                    pass
                state.probe_output_tokens += r.n_out
                if r.success:
                    caps.token_ids = rti and bool(r.output_ids)
                    caps.usage = r.prompt_tokens is not None  # usage carries prompt_tokens
                    if ext and r.n_out < 2:
                        caps.notes.append("server accepted ignore_eos but stopped early")
                    if rti and not caps.token_ids:
                        caps.notes.append("return_token_ids not honoured; recording text")
                    if mode == "text":
                        caps.notes.append("text prompts: lengths approximate (usage has the real counts)")
                    if not ext:
                        caps.notes.append("no ignore_eos/min_tokens: outputs may end before max_tokens")
                    if rejected:
                        caps.notes.append("rejected: " + " | ".join(rejected))
                    return caps
                if r.error and r.error.startswith("http 4"):
                    rejected.append(f"{mode}{'+ext' if ext else ''}: {r.error[:120]}")
                    continue
                raise FatalError(f"probe request to {cfg.url} failed: {r.error}")
    raise FatalError(f"server rejected every request form: {' | '.join(rejected)}")


# ------------------------------------------------------------------ the run


async def run(specs: Sequence[RequestSpec], cfg: ClientConfig, state: RunState,
              on_done: Callable[[RequestResult], None] | None = None) -> None:
    """Send specs at their arrival times; results land in state.results (pre-filled, so an
    interruption at any point leaves every request accounted for)."""
    state.results = [RequestResult(index=s.index, prompt_len=s.prompt_len, output_len=s.output_len,
                                   scheduled_s=s.arrival_s, ttft_slo_s=s.ttft_slo_s, tbt_slo_s=s.tbt_slo_s)
                     for s in specs]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = cfg.model
        if model is None:
            models = await fetch_models(session, cfg.root, cfg.connect_timeout_s)
            if not models:
                raise FatalError(f"{cfg.base_url}/v1/models lists no model; pass --model")
            model = models[0]
        state.model = model
        if cfg.prompt_mode == "auto" or cfg.record_outputs:
            state.caps = await probe(session, cfg, model, state)
        else:
            state.caps = ServerCaps(prompt_mode=cfg.prompt_mode, extensions=cfg.extensions)
        caps = state.caps

        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        aborted = asyncio.Event()
        consecutive_fail = 0
        tasks: set[asyncio.Task] = set()

        async def one(spec: RequestSpec, r: RequestResult) -> None:
            nonlocal consecutive_fail
            body = make_body(cfg, caps, model, spec.index, spec.prompt_len, spec.output_len,
                             spec.ttft_slo_s, spec.tbt_slo_s)
            try:
                if sem:
                    async with sem:
                        if aborted.is_set():
                            return
                        await stream_one(session, cfg.url, body, r, state.t0, cfg.timeout_s,
                                         caps.extensions, cfg.record_outputs)
                else:
                    await stream_one(session, cfg.url, body, r, state.t0, cfg.timeout_s,
                                     caps.extensions, cfg.record_outputs)
                consecutive_fail = 0
            except _ConnectFailure:
                consecutive_fail += 1
                if consecutive_fail >= cfg.abort_after and not aborted.is_set():
                    state.abort_reason = (f"aborted after {consecutive_fail} consecutive connection "
                                          f"failures (last: {r.error})")
                    aborted.set()
            if on_done is not None:
                on_done(r)

        state.t0 = time.perf_counter()
        try:
            for spec, r in zip(specs, state.results):
                delay = state.t0 + spec.arrival_s - time.perf_counter()
                if delay > 0:
                    try:
                        await asyncio.wait_for(aborted.wait(), delay)
                    except TimeoutError:
                        pass
                if aborted.is_set():
                    break
                t = asyncio.create_task(one(spec, r))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            # Wait for the rest, but stop early once the run is aborted.
            while tasks and not aborted.is_set():
                waiter = asyncio.create_task(aborted.wait())
                await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us
            state.abort_reason = state.abort_reason or "interrupted"
            raise
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            state.finalize("cancelled: run aborted" if aborted.is_set() else "interrupted")


def default_trace_path() -> str | None:
    """../shared/traces/azure_llm_2023_conv.csv relative to the repo root, if present."""
    from pathlib import Path

    p = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
    return str(p) if p.exists() else None
