"""OpenAI-compatible request schemas, their validation, and response builders.

Requests are decoded with msgspec so a wrong type is reported with the JSON path of the
offending field. Unknown fields are ignored (clients send many we do not use).
Streaming chunks are assembled from pre-encoded byte prefixes/suffixes so that the
per-token cost is one ``msgspec.json.encode`` of the new text.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import msgspec

# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered to the client as an OpenAI-style JSON error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code if code is not None else status

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.to_dict())


def error_body(message: str, type: str, code: int | str, param: str | None = None) -> bytes:
    return APIError(message, type=type, code=code, param=param).to_json()


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def _field_from_error(message: str) -> str | None:
    """Turn msgspec's "... - at `$.stop[0]`" into the field name "stop"."""
    m = _PATH_RE.search(message)
    if not m or not m.group(1):
        return None
    return re.split(r"[.\[]", m.group(1), maxsplit=1)[0] or None


# ---------------------------------------------------------------- request schemas


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class GenerationRequest(msgspec.Struct, kw_only=True):
    """Sampling and extension fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    logprobs: Any = None
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM-style extensions
    ignore_eos: bool = False
    min_tokens: int = 0
    # Ascendra extensions: per-request SLOs in milliseconds
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None


class CompletionRequest(GenerationRequest, kw_only=True):
    prompt: str | list[int | str | list[int]]


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None


def decode_request(body: bytes, cls: type) -> Any:
    """Decode and type-check a request body; raises APIError naming the field."""
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        msg = str(e)
        param = _field_from_error(msg)
        if param is None and msg.startswith("Object missing required field"):
            m = re.search(r"`([^`]+)`", msg)
            param = m.group(1) if m else None
        raise APIError(msg, param=param) from None
    except msgspec.DecodeError as e:
        raise APIError(f"Request body is not valid JSON: {e}", param=None) from None


def validate_common(req: GenerationRequest) -> None:
    """Value checks msgspec's types cannot express. Raises APIError naming the field."""
    if req.n != 1:
        raise APIError("Only n=1 is supported.", param="n")
    if req.best_of is not None and req.best_of != 1:
        raise APIError("Only best_of=1 is supported.", param="best_of")
    if req.logprobs not in (None, False, 0):
        raise APIError("logprobs are not supported.", param="logprobs")
    if req.echo:
        raise APIError("echo is not supported.", param="echo")
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise APIError(f"max_tokens must be at least 1, got {req.max_tokens}.", param="max_tokens")
    if req.temperature is not None and req.temperature < 0:
        raise APIError(f"temperature must be non-negative, got {req.temperature}.", param="temperature")
    if req.top_p is not None and not (0.0 < req.top_p <= 1.0):
        raise APIError(f"top_p must be in (0, 1], got {req.top_p}.", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(f"top_k must be -1 (disabled) or at least 1, got {req.top_k}.", param="top_k")
    if req.min_tokens < 0:
        raise APIError(f"min_tokens must be non-negative, got {req.min_tokens}.", param="min_tokens")
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise APIError(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({req.max_tokens}).",
            param="min_tokens",
        )
    stops = stop_list(req.stop)
    if any(s == "" for s in stops):
        raise APIError("stop strings must not be empty.", param="stop")
    for name in ("ttft_slo_ms", "tbt_slo_ms"):
        v = getattr(req, name)
        if v is not None and v <= 0:
            raise APIError(f"{name} must be positive, got {v}.", param=name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return list(stop)


def prompt_of(req: CompletionRequest) -> str | list[int]:
    """The single prompt of a completion request, as text or token ids."""
    p = req.prompt
    if isinstance(p, str):
        return p
    if not p:
        raise APIError("prompt must not be empty.", param="prompt")
    if all(isinstance(x, int) for x in p):
        return p  # type: ignore[return-value]
    if len(p) == 1 and isinstance(p[0], (str, list)):
        return p[0]  # type: ignore[return-value]
    if any(isinstance(x, int) for x in p):
        raise APIError("prompt mixes token ids with other types.", param="prompt")
    raise APIError("Batched prompts are not supported; send one prompt per request.", param="prompt")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the plain dicts chat templates expect (text parts joined)."""
    if not req.messages:
        raise APIError("messages must not be empty.", param="messages")
    out = []
    for m in req.messages:
        c = m.content
        if c is None:
            text = ""
        elif isinstance(c, str):
            text = c
        else:
            parts = []
            for part in c:
                if part.type != "text":
                    raise APIError(f"Content part type {part.type!r} is not supported.", param="messages")
                parts.append(part.text or "")
            text = "".join(parts)
        out.append({"role": m.role, "content": text})
    return out


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChunkWriter:
    """Builds SSE event bytes for one streaming request.

    The constant part of each chunk is encoded once; a token event costs one JSON
    encode of the new text plus two byte concatenations.
    """

    __slots__ = ("_head", "_tail", "_final_head", "_usage_head", "_chat")

    def __init__(self, request_id: str, model: str, created: int, chat: bool) -> None:
        enc = msgspec.json.encode
        self._chat = chat
        if chat:
            obj = b'"chat.completion.chunk"'
            self._head = (
                b'data: {"id":' + enc(request_id) + b',"object":' + obj + b',"created":'
                + str(created).encode() + b',"model":' + enc(model)
                + b',"choices":[{"index":0,"delta":{"content":'
            )
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            obj = b'"text_completion"'
            self._head = (
                b'data: {"id":' + enc(request_id) + b',"object":' + obj + b',"created":'
                + str(created).encode() + b',"model":' + enc(model)
                + b',"choices":[{"index":0,"text":'
            )
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._usage_head = (
            b'data: {"id":' + enc(request_id) + b',"object":' + obj + b',"created":'
            + str(created).encode() + b',"model":' + enc(model) + b',"choices":[],"usage":'
        )

    def role(self) -> bytes:
        """Chat streams open with an assistant-role delta, as OpenAI's do."""
        return self._head[: -len(b'"content":')] + b'"role":"assistant","content":""' + self._tail

    def text(self, text: str) -> bytes:
        return self._head + msgspec.json.encode(text) + self._tail

    def final(self, text: str, finish_reason: str) -> bytes:
        tail = self._tail.replace(b'"finish_reason":null', b'"finish_reason":' + msgspec.json.encode(finish_reason))
        return self._head + msgspec.json.encode(text) + tail

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._usage_head + msgspec.json.encode(usage_dict(prompt_tokens, completion_tokens)) + b"}\n\n"


DONE = b"data: [DONE]\n\n"


def sse_error(message: str, type: str, code: int | str) -> bytes:
    return b"data: " + error_body(message, type, code) + b"\n\n"


def completion_response(
    request_id: str, model: str, created: int, text: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    return msgspec.json.encode({
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    })


def chat_response(
    request_id: str, model: str, created: int, text: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    return msgspec.json.encode({
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    })


def models_response(names: list[str], max_model_len: int, created: int | None = None) -> bytes:
    created = created if created is not None else int(time.time())
    return msgspec.json.encode({
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "ascendra",
             "max_model_len": max_model_len}
            for n in names
        ],
    })
