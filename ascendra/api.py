"""HTTP handlers: OpenAI-compatible completions and chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from ascendra import messages as m
from ascendra.coordinator import Coordinator
from ascendra.served_request import OutputOptions, ServedRequest
from ascendra.protocol import (
    APIError,
    ChatCompletionRequest,
    Choice,
    ChunkWriter,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
    DONE,
    chat_messages,
    choices_response,
    decode_request,
    logprobs_of,
    models_response,
    new_id,
    prompts_of,
    stop_list,
    validate_common,
)
from ascendra.structured import guide_regex

log = logging.getLogger("ascendra.api")

JSON = "application/json"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def _short(e: Exception, limit: int = 200) -> str:
    """An exception's message for a client: its text only (no repr, no traceback), cut short."""
    text = str(e) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def error_response(err: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return json_response(err.to_json(), status=err.status, headers=headers)


@dataclass
class APILimits:
    """What one request may cost the coordinator before a worker sees it.

    0 means "derive from the model": the body bound is a few bytes per token of context
    (token ids as JSON take up to ~8 bytes each, text up to ~4 bytes per character);
    the character bound is checked before tokenising, so a prompt that cannot fit is
    refused without spending CPU on it.
    """

    max_request_bytes: int = 0
    max_prompt_chars: int = 0
    body_timeout: float = 60.0  # seconds to receive a request body once its headers are in
    api_key: str | None = None
    allow_request_chat_template: bool = False

    def resolved(self, max_model_len: int) -> "APILimits":
        return APILimits(
            max_request_bytes=self.max_request_bytes or 64 * 1024 + 32 * max_model_len,
            max_prompt_chars=self.max_prompt_chars or 16 * max_model_len,
            body_timeout=self.body_timeout,
            api_key=self.api_key,
            allow_request_chat_template=self.allow_request_chat_template,
        )


# Texts shorter than this are tokenised on the event loop: a thread hop costs more than them.
INLINE_TOKENIZE_CHARS = 4096
# After tokenising a text this long, hand the freed memory back to the OS (see _trim_heap).
TRIM_AFTER_CHARS = 256 * 1024


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_malloc_trim = _load_malloc_trim()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ascendra")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _trim_heap() -> None:
    """glibc keeps the tokeniser's freed arenas (hundreds of MB for a multi-MB prompt);
    malloc_trim returns them, so one huge request does not leave the coordinator fat."""
    if _malloc_trim is not None:
        _malloc_trim(0)


# apply_chat_template keywords a request must not steer through chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class API:
    def __init__(self, coordinator: Coordinator, served_names: list[str], limits: APILimits | None = None) -> None:
        self.coord = coordinator
        # The first name is what responses report; the others are accepted aliases.
        self.model_name = served_names[0]
        self.accepted_models = set(served_names)
        self.tokenizer = coordinator.tokenizer
        self.limits = (limits or APILimits()).resolved(self._max_model_len())
        self._api_key = self.limits.api_key.encode() if self.limits.api_key else None
        # Tokenising and templating long texts runs here, so the event loop keeps streaming
        # other requests' tokens. Two threads: a burst of huge prompts queues, bounded.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """APIError -> OpenAI-style JSON error; aiohttp's own 4xx under /v1 get the same shape."""
        try:
            return await handler(request)
        except APIError as e:
            if e.status in (400, 404, 413, 415):
                self.coord.metrics.rejected.inc(1, "invalid")
            return error_response(e)
        except web.HTTPException as e:
            if e.status >= 400 and request.path.startswith("/v1/"):
                return error_response(APIError(e.reason, status=e.status, type="invalid_request_error", code=e.status))
            raise
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away; nothing to answer
        except Exception:
            # The detail goes to the log only: a response never carries a Python repr.
            log.exception("unexpected error serving %s", request.path)
            return error_response(APIError("Internal server error; the server log has the details.", status=500,
                                           type="internal_server_error"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """--api-key: /v1/* needs "Authorization: Bearer <key>"; /health and /metrics stay open."""
        if self._api_key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            ok = hmac.compare_digest(token.strip().encode(), self._api_key) and scheme.lower() == "bearer"
            if not ok:
                self.coord.metrics.rejected.inc(1, "unauthorized")
                return json_response(
                    APIError("Invalid or missing API key (Authorization: Bearer <key>).", status=401,
                             type="authentication_error", code=401).to_json(),
                    status=401, headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth, self._errors],
                              client_max_size=self.limits.max_request_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        # vLLM's utility endpoints, so its clients and scripts find them here too.
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/version", self.version)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/ping", self.ping)
        app.router.add_get("/metrics", self.metrics)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_cleanup(self, app: web.Application) -> None:
        self.close()

    # ------------------------------------------------------------ simple endpoints

    async def models(self, request: web.Request) -> web.Response:
        return json_response(models_response([self.model_name], self._max_model_len()))

    async def health(self, request: web.Request) -> web.Response:
        # Short on purpose: worker pids and failure texts go to the log and /metrics.
        status = 200 if self.coord.healthy and self.coord.accepting else 503
        return json_response(msgspec.json.encode(self.coord.health()), status=status)

    async def ping(self, request: web.Request) -> web.Response:
        """Liveness as vLLM answers it (SageMaker-style): 200 when serving, 503 otherwise."""
        status = 200 if self.coord.healthy and self.coord.accepting else 503
        return json_response(b"{}", status=status)

    async def version(self, request: web.Request) -> web.Response:
        return json_response(msgspec.json.encode({"version": _package_version()}))

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = decode_request(await self._read_body(request), TokenizeRequest)
        self._check_model(req.model)
        tok = self.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError("Send exactly one of prompt and messages.", param="prompt")
        if req.prompt is not None:
            text = req.prompt
            self._check_chars(len(text), "prompt")
            add = req.add_special_tokens
            ids = await self._off_loop(lambda: tok.encode(text, add_special_tokens=add), len(text))
        else:
            chat = ChatCompletionRequest(messages=req.messages or [])
            msgs = chat_messages(chat)
            size = sum(len(x["content"]) for x in msgs)
            self._check_chars(size, "messages")
            gen = req.add_generation_prompt

            def render() -> list[int]:
                # As /v1/chat/completions does: the template adds the special tokens.
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                return tok.encode(text, add_special_tokens=False)

            try:
                ids = await self._off_loop(render, size)
            except Exception as e:
                raise APIError(f"Cannot apply the chat template: {_short(e)}", param="messages") from None
        body: dict[str, Any] = {"count": len(ids), "max_model_len": self._max_model_len(), "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = tok.convert_ids_to_tokens(ids)
        return json_response(msgspec.json.encode(body))

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = decode_request(await self._read_body(request), DetokenizeRequest)
        self._check_model(req.model)
        ids = self._check_token_ids(req.tokens, "tokens")
        dec = self.tokenizer.decode
        text = await self._off_loop(lambda: dec(ids), len(ids) * 4)
        return json_response(msgspec.json.encode({"prompt": text}))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.coord.render_metrics(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Format": "prometheus-0.0.4"})

    # ------------------------------------------------------------ request intake

    async def _read_body(self, request: web.Request) -> bytes:
        """The body of a JSON request, bounded in type, size and time."""
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != JSON:
            raise APIError(f"Content-Type must be {JSON}, got {ctype or 'none'!r}.", status=415,
                           param="Content-Type", code=415)
        limit = self.limits.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise self._too_large(request.content_length)
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                return await request.read()
        except TimeoutError:
            raise APIError(f"The request body did not arrive within {self.limits.body_timeout:g}s.",
                           status=408, code=408) from None
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large(None) from None

    def _too_large(self, size: int | None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(f"The request body{got} exceeds the limit of {self.limits.max_request_bytes} bytes "
                        "(--max-request-bytes).", status=413, code=413)

    def _check_chars(self, n: int, param: str) -> None:
        if n > self.limits.max_prompt_chars:
            raise APIError(
                f"The {param} has {n} characters, more than this server accepts ({self.limits.max_prompt_chars}, "
                f"--max-prompt-chars); it could not fit the model's context of {self._max_model_len()} tokens.",
                param=param, code="context_length_exceeded",
            )

    async def _off_loop(self, fn: Any, size: int) -> Any:
        """Run fn on the tokenizer threads unless the text is small enough to be quicker here."""
        if size < INLINE_TOKENIZE_CHARS:
            return fn()

        def run() -> Any:
            try:
                return fn()
            finally:
                if size >= TRIM_AFTER_CHARS:
                    _trim_heap()

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    # ------------------------------------------------------------ generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req: CompletionRequest = decode_request(await self._read_body(request), CompletionRequest)
        self._check_common(req)
        all_ids: list[list[int]] = []
        echoes: list[str] = []
        encode, decode = self.tokenizer.encode, self.tokenizer.decode
        for prompt in prompts_of(req):
            if isinstance(prompt, str):
                if not prompt:
                    raise APIError("prompt must not be empty.", param="prompt")
                self._check_chars(len(prompt), "prompt")
                ids = await self._off_loop(lambda p=prompt: encode(p), len(prompt))
                echo = prompt
            else:
                if not prompt:
                    raise APIError("prompt must not be empty.", param="prompt")
                ids = self._check_token_ids(prompt, "prompt")
                echo = decode(ids) if req.echo else ""
            all_ids.append(ids)
            echoes.append(echo if req.echo else "")
        max_tokens = [self._max_tokens(req, ids, default=16, param="prompt") for ids in all_ids]
        return await self._generate(request, req, all_ids, max_tokens, arrival, chat=False, echoes=echoes)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req: ChatCompletionRequest = decode_request(await self._read_body(request), ChatCompletionRequest)
        if req.max_completion_tokens is not None:
            # OpenAI's successor of max_tokens; it wins when both are sent, as in vLLM.
            if req.max_completion_tokens <= 0:
                raise APIError(f"max_completion_tokens must be at least 1, got {req.max_completion_tokens}.",
                               param="max_completion_tokens")
            req.max_tokens = req.max_completion_tokens
        self._check_common(req)
        if req.echo:
            raise APIError("echo is supported by /v1/completions only.", param="echo")
        msgs = chat_messages(req)
        self._check_chars(sum(len(x["content"]) for x in msgs), "messages")
        kwargs = self._template_kwargs(req)
        tok = self.tokenizer

        def render() -> list[int]:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                                           **kwargs)
            return tok.encode(text, add_special_tokens=False)

        try:
            # A request's own template may loop for long whatever the text size: never on the loop.
            size = INLINE_TOKENIZE_CHARS if "chat_template" in kwargs else sum(len(x["content"]) for x in msgs)
            ids = await self._off_loop(render, size)
        except Exception as e:  # template errors are the caller's (e.g. a role it rejects)
            log.debug("chat template failed: %r", e)
            raise APIError(f"Cannot apply the chat template: {_short(e)}", param="messages") from None
        max_tokens = self._max_tokens(req, ids, default=None, param="messages")
        return await self._generate(request, req, [ids], [max_tokens], arrival, chat=True)

    def _template_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """chat_template_kwargs as apply_chat_template takes them; a request's own template only if allowed."""
        kwargs = dict(req.chat_template_kwargs or {})
        template = req.chat_template
        if "chat_template" in kwargs:
            template = kwargs.pop("chat_template")
            param = "chat_template_kwargs"
        else:
            param = "chat_template"
        if template is not None:
            if not self.limits.allow_request_chat_template:
                # A Jinja template is a program: one request could spin the tokenizer threads.
                raise APIError("Request-supplied chat templates are disabled on this server "
                               "(--allow-request-chat-template enables them).", param=param)
            if not isinstance(template, str):
                raise APIError("chat_template must be a string.", param=param)
            kwargs["chat_template"] = template
        for key in kwargs:
            if key in _RESERVED_TEMPLATE_KWARGS and key != "chat_template":
                raise APIError(f"chat_template_kwargs may not set {key!r}.", param="chat_template_kwargs")
        return kwargs

    def _check_common(self, req: GenerationRequest) -> None:
        validate_common(req)
        guide_regex(req)
        if req.stop_token_ids:
            self._check_token_ids(req.stop_token_ids, "stop_token_ids")
        self._check_model(req.model)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.accepted_models:
            raise APIError(f"The model `{model}` does not exist.", status=404, type="NotFoundError",
                           param="model", code=404)

    def _max_model_len(self) -> int:
        info = self.coord.model_info
        return info.max_model_len if info is not None else 0

    def _check_token_ids(self, ids: list[int], param: str) -> list[int]:
        info = self.coord.model_info
        vocab = info.vocab_size if info is not None else len(self.tokenizer)
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(f"Token id {t} is out of vocabulary range [0, {vocab}).", param=param)
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

    def _sampling(self, req: GenerationRequest, max_tokens: int, sample: int = 0,
                  guided_regex: str | None = None) -> m.SamplingParams:
        top_k = req.top_k if req.top_k is not None else 0
        # The n samples of one prompt draw from different streams, reproducibly under one seed.
        seed = req.seed
        if seed is not None and sample:
            seed = (seed + sample + 2**63) % 2**64 - 2**63
        return m.SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else 1.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            top_k=0 if top_k < 0 else top_k,
            seed=seed,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
            logprobs=logprobs_of(req),
            guided_regex=guided_regex,
        )

    async def _generate(
        self, request: web.Request, req: GenerationRequest, prompts: list[list[int]], max_tokens: list[int],
        arrival: float, chat: bool, echoes: list[str] | None = None,
    ) -> web.StreamResponse:
        """One request per (prompt, sample): choice index = prompt index x n + sample."""
        coord = self.coord
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        include_usage = bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)
        single = len(prompts) * req.n == 1
        options = OutputOptions(include_stop_str=req.include_stop_str_in_output,
                                skip_special_tokens=req.skip_special_tokens, return_token_ids=req.return_token_ids,
                                tokens_as_ids=req.return_tokens_as_token_ids, chat=chat)
        want_ids = req.return_token_ids
        guided = guide_regex(req)  # validated in _check_common: the same regex for every choice
        states: list[ServedRequest] = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(req.n):
                    index = i * req.n + j
                    chunks = ChunkWriter(rid, self.model_name, created, chat, index,
                                         prompt_ids=ids if want_ids else None) if req.stream else None
                    st = coord.new_request(
                        rid if single else f"{rid}-{index}", ids, self._sampling(req, max_tokens[i], j, guided), arrival,
                        stop_list(req.stop), chunks, include_usage and single,
                        ttft_slo=req.ttft_slo_ms / 1000.0 if req.ttft_slo_ms is not None else None,
                        tbt_slo=req.tbt_slo_ms / 1000.0 if req.tbt_slo_ms is not None else None,
                        options=options,
                    )
                    coord.submit(st)  # raises APIError (429 / 503) before anything is written
                    states.append(st)
            echo = [echoes[k // req.n] if echoes else "" for k in range(len(states))]
            if req.stream:
                return await self._stream_all(request, states, chat, echo, prompts, include_usage)
            for st in states:
                await st.wait_done()
        except asyncio.CancelledError:  # the client closed the connection (handler_cancellation)
            for st in states:
                if not st.client_done:
                    self._disconnected(st)
            raise
        finally:
            for st in states:
                if not st.client_done:
                    coord.abort(st)
        for st in states:
            if st.error is not None:
                return error_response(st.error)
        choices = []
        for k, (e, st) in enumerate(zip(echo, states)):
            logprobs, token_ids = st.log.all() if st.log is not None else (None, None)
            choices.append(Choice(e + st.text, st.finish_reason or "stop", logprobs, token_ids,
                                  prompts[k // req.n] if want_ids else None))
        body = choices_response(rid, self.model_name, created, choices, sum(len(ids) for ids in prompts),
                                sum(st.num_tokens for st in states), chat)
        return json_response(body)

    async def _stream_all(
        self, request: web.Request, states: list[ServedRequest], chat: bool, echo: list[str],
        prompts: list[list[int]], include_usage: bool,
    ) -> web.StreamResponse:
        if len(states) == 1 and not echo[0]:
            return await self._stream(request, states[0], states[0].chunks, chat)
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            # Each choice opens with its role delta (chat) and echoed prompt, sent with its first
            # token: clients time the first chunk with choices as the first token.
            heads = [(st.chunks.role() if chat and st.chunks is not None else b"")
                     + (st.chunks.text(e) if e and st.chunks is not None else b"")
                     for st, e in zip(states, echo)]
            if len(states) == 1:  # echo only: the one stream carries its own usage and [DONE]
                await self._pump(resp, states[0], head=heads[0])
            else:
                # Choices interleave as their tokens come; each sub-stream's [DONE] is dropped and
                # one usage (prompts counted once each) and one [DONE] end the merged stream.
                await asyncio.gather(*(self._pump(resp, st, strip_done=True, head=h)
                                       for st, h in zip(states, heads)))
                if include_usage and states[0].chunks is not None:
                    await resp.write(states[0].chunks.usage(sum(len(ids) for ids in prompts),
                                                            sum(st.num_tokens for st in states)))
                await resp.write(DONE)
            await resp.write_eof()
        except ConnectionError:
            for st in states:
                if not st.client_done:
                    self._disconnected(st)
        return resp

    async def _pump(self, resp: web.StreamResponse, st: ServedRequest, strip_done: bool = False,
                    head: bytes = b"") -> None:
        """Write the request's chunks as they come; ``head`` goes out with the first of them."""
        while True:
            data, last = await st.next_chunk()
            if strip_done and last and data.endswith(DONE):
                data = data[: -len(DONE)]
            if head and (data or last):
                data, head = head + data, b""
            if data:
                await resp.write(data)
            if last:
                return

    async def _stream(
        self, request: web.Request, st: ServedRequest, chunks: ChunkWriter | None, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            # The role delta waits for the first token, as vLLM's does: a client that times the
            # first chunk carrying choices (vllm bench serve) then measures the real TTFT.
            await self._pump(resp, st, head=chunks.role() if chat and chunks is not None else b"")
            await resp.write_eof()
        except ConnectionError:  # an ordinary disconnect mid-stream: not a server error
            self._disconnected(st)
        return resp

    def _disconnected(self, st: ServedRequest) -> None:
        self.coord.metrics.client_disconnects.inc()
        log.debug("client disconnected from %s", st.request_id)
