"""One request as the coordinator serves it: detokenizer, stop matcher, client buffer.

The HTTP handler awaits ``next_chunk``/``wait_done``; the coordinator's lifecycle calls
``push``, ``finish``, ``fail`` and ``close_aborted``. (``messages.RequestState`` is a
different thing: a request's state as it moves between workers.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ascendra import messages as m
from ascendra.detokenizer import StopChecker
from ascendra.protocol import DONE, APIError, ChunkWriter, sse_error
from ascendra.token_log import TokenLog


@dataclass(frozen=True)
class OutputOptions:
    """How one request's output is written for its client (fields of the API request)."""

    include_stop_str: bool = False  # the matched stop string / stop token stays in the text
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    tokens_as_ids: bool = False  # logprob tokens as "token_id:<id>"
    chat: bool = False


def unavailable(message: str) -> APIError:
    """The 503 every "cannot serve this now" case answers with."""
    return APIError(message, status=503, type="service_unavailable_error", code=503)


class ServedRequest:
    __slots__ = (
        "request_id", "prompt_ids", "sampling", "arrival", "ttft_slo", "tbt_slo", "route",
        "detok", "stop", "min_tokens", "chunks", "include_usage", "buf", "texts",
        "waiter", "done", "client_done", "finish_reason", "error", "instance_id",
        "num_tokens", "first_token_time", "last_token_time", "dispatch_time", "options", "log",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: m.SamplingParams,
        arrival: float,
        ttft_slo: float | None,
        tbt_slo: float | None,
        detok: Any,
        stops: list[str],
        chunks: ChunkWriter | None,
        include_usage: bool = False,
        options: OutputOptions | None = None,
        log: TokenLog | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.arrival = arrival
        self.ttft_slo = ttft_slo
        self.tbt_slo = tbt_slo
        self.detok = detok
        self.options = options or OutputOptions()
        self.stop = StopChecker(stops, self.options.include_stop_str) if stops else None
        # Token ids / logprobs the client asked to see (None: neither, the usual case).
        self.log = log
        self.min_tokens = sampling.min_tokens
        self.chunks = chunks  # None: non-streaming, collect text instead of SSE bytes
        self.include_usage = include_usage
        self.buf: list[bytes] = []
        self.texts: list[str] = []
        self.waiter: asyncio.Future | None = None
        self.done = False  # the client side has its final event
        self.client_done = False  # no more output goes to the client
        self.finish_reason: str | None = None
        self.error: APIError | None = None
        self.instance_id = -1
        self.num_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        self.dispatch_time = 0.0

    # ---- handler side

    async def next_chunk(self) -> tuple[bytes, bool]:
        """Everything buffered for the client since the last call, and whether it was the last."""
        while not self.buf and not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        data = b"".join(self.buf)
        self.buf.clear()
        return data, self.done

    async def wait_done(self) -> None:
        while not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    # ---- coordinator side

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def push(self, text: str) -> None:
        """More output text for the client (with the new tokens' ids and logprobs, if asked)."""
        if self.chunks is not None:
            log = self.log
            if log is None:
                self.buf.append(self.chunks.text(text))
            else:
                self.buf.append(self.chunks.event(text, None, *log.take()))
            self._wake()
        else:
            self.texts.append(text)

    def finish(self, reason: str, text: str) -> None:
        """The last text and the finish reason; the client side ends."""
        self.client_done = True
        self.finish_reason = reason
        if self.chunks is not None:
            if self.log is None:
                self.buf.append(self.chunks.final(text, reason))
            else:
                self.buf.append(self.chunks.event(text, reason, *self.log.take()))
            if self.include_usage:
                self.buf.append(self.chunks.usage(len(self.prompt_ids), self.num_tokens))
            self.buf.append(DONE)
        else:
            self.texts.append(text)
        self.done = True
        self._wake()

    def fail(self, err: APIError) -> None:
        """End the client side with an error event (streaming) or the error (non-streaming)."""
        self.client_done = True
        self.finish_reason = "error"
        self.error = err
        if self.chunks is not None:
            self.buf.append(sse_error(err.message, err.type, err.code))
            self.buf.append(DONE)
        self.done = True
        self._wake()

    def close_aborted(self) -> None:
        """The client went away: nothing more is written, and nobody waits."""
        self.client_done = True
        self.finish_reason = "abort"
        self.done = True


__all__ = ["OutputOptions", "ServedRequest", "unavailable"]
