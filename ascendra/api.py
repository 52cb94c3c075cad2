"""HTTP handlers: OpenAI-compatible completions and chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from aiohttp import web

from ascendra import messages as m
from ascendra.coordinator import Coordinator, RequestState
from ascendra.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    GenerationRequest,
    chat_messages,
    chat_response,
    completion_response,
    decode_request,
    models_response,
    new_id,
    prompt_of,
    stop_list,
    validate_common,
)

log = logging.getLogger("ascendra.api")

JSON = "application/json"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def error_response(err: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return json_response(err.to_json(), status=err.status, headers=headers)


class API:
    def __init__(self, coordinator: Coordinator, served_names: list[str]) -> None:
        self.coord = coordinator
        # The first name is what responses report; the others are accepted aliases.
        self.model_name = served_names[0]
        self.accepted_models = set(served_names)
        self.tokenizer = coordinator.tokenizer

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """APIError -> OpenAI-style JSON error; aiohttp's own 4xx under /v1 get the same shape."""
        try:
            return await handler(request)
        except APIError as e:
            if e.status in (400, 404):
                self.coord.metrics.rejected.inc(1, "invalid")
            return error_response(e)
        except web.HTTPException as e:
            if e.status >= 400 and request.path.startswith("/v1/"):
                return error_response(APIError(e.reason, status=e.status, type="invalid_request_error", code=e.status))
            raise
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away; nothing to answer
        except Exception as e:
            log.exception("unexpected error serving %s", request.path)
            return error_response(APIError(f"Internal error: {e!r}", status=500, type="internal_server_error"))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    # ------------------------------------------------------------ simple endpoints

    async def models(self, request: web.Request) -> web.Response:
        return json_response(models_response([self.model_name], self._max_model_len()))

    async def health(self, request: web.Request) -> web.Response:
        status = 200 if self.coord.healthy and self.coord.accepting else 503
        return json_response(msgspec.json.encode(self.coord.health()), status=status)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.coord.render_metrics(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Format": "prometheus-0.0.4"})

    # ------------------------------------------------------------ generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req: CompletionRequest = decode_request(await request.read(), CompletionRequest)
        self._check_common(req)
        prompt = prompt_of(req)
        if isinstance(prompt, str):
            if not prompt:
                raise APIError("prompt must not be empty.", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self._check_token_ids(prompt)
        max_tokens = self._max_tokens(req, ids, default=16, param="prompt")
        return await self._generate(request, req, ids, max_tokens, arrival, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req: ChatCompletionRequest = decode_request(await request.read(), ChatCompletionRequest)
        if req.max_tokens is None and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
            if req.max_tokens <= 0:
                raise APIError(f"max_completion_tokens must be at least 1, got {req.max_tokens}.",
                               param="max_completion_tokens")
        self._check_common(req)
        msgs = chat_messages(req)
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # template errors are the caller's (e.g. a role it rejects)
            raise APIError(f"Cannot apply the chat template: {e}", param="messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = self._max_tokens(req, ids, default=None, param="messages")
        return await self._generate(request, req, ids, max_tokens, arrival, chat=True)

    def _check_common(self, req: GenerationRequest) -> None:
        validate_common(req)
        if req.model is not None and req.model not in self.accepted_models:
            raise APIError(f"The model `{req.model}` does not exist.", status=404, type="NotFoundError",
                           param="model", code=404)

    def _max_model_len(self) -> int:
        info = self.coord.model_info
        return info.max_model_len if info is not None else 0

    def _check_token_ids(self, ids: list[int]) -> list[int]:
        info = self.coord.model_info
        vocab = info.vocab_size if info is not None else len(self.tokenizer)
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(f"Token id {t} is out of vocabulary range [0, {vocab}).", param="prompt")
        return list(ids)

    def _max_tokens(self, req: GenerationRequest, ids: list[int], default: int | None, param: str) -> int:
        limit = self._max_model_len()
        n = len(ids)
        if n == 0:
            raise APIError("The prompt is empty after tokenisation.", param=param)
        if n >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {n} tokens "
                "(no room left for output). Please reduce the length of the prompt.",
                param=param, code="context_length_exceeded",
            )
        if req.max_tokens is None:
            room = limit - n
            return min(default, room) if default is not None else room
        if n + req.max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + req.max_tokens} tokens ({n} in the prompt, {req.max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded",
            )
        # A request must fit in one worker's KV pool, or no worker could ever finish it.
        capacity = self.coord.kv_capacity_tokens
        if capacity is not None and n + req.max_tokens > capacity:
            raise APIError(
                f"The request needs up to {n + req.max_tokens} tokens of KV cache ({n} in the prompt, "
                f"{req.max_tokens} for the completion) but a worker holds only {capacity} "
                "(--num-blocks x --block-size). Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
            )
        return req.max_tokens

    def _sampling(self, req: GenerationRequest, max_tokens: int) -> m.SamplingParams:
        top_k = req.top_k if req.top_k is not None else 0
        return m.SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else 1.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            top_k=0 if top_k < 0 else top_k,
            seed=req.seed,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
        )

    async def _generate(
        self, request: web.Request, req: GenerationRequest, ids: list[int], max_tokens: int, arrival: float, chat: bool
    ) -> web.StreamResponse:
        coord = self.coord
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        include_usage = bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)
        chunks = ChunkWriter(rid, self.model_name, created, chat) if req.stream else None
        st = coord.new_request(
            rid, ids, self._sampling(req, max_tokens), arrival, stop_list(req.stop), chunks, include_usage,
            ttft_slo=req.ttft_slo_ms / 1000.0 if req.ttft_slo_ms is not None else None,
            tbt_slo=req.tbt_slo_ms / 1000.0 if req.tbt_slo_ms is not None else None,
        )
        coord.submit(st)  # raises APIError (429 / 503) before anything is written
        try:
            if req.stream:
                return await self._stream(request, st, chunks, chat)
            await st.wait_done()
        finally:
            if not st.client_done:
                coord.abort(st)
        if st.error is not None:
            return error_response(st.error)
        body = (chat_response if chat else completion_response)(
            rid, self.model_name, created, st.text, st.finish_reason or "stop", len(ids), st.num_tokens
        )
        return json_response(body)

    async def _stream(
        self, request: web.Request, st: RequestState, chunks: ChunkWriter | None, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        await resp.prepare(request)
        if chat and chunks is not None:
            await resp.write(chunks.role())
        while True:
            data, last = await st.next_chunk()
            if data:
                await resp.write(data)
            if last:
                break
        await resp.write_eof()
        return resp
