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
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ascendra.messages import MAX_LOGPROBS

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


# Bounds every field carries, so that nothing a client sends can overflow the worker
# message (msgpack integers are 64-bit) or the sampler (see TEMPERATURE_FLOOR).
INT32_MAX = 2**31 - 1
Count = Annotated[int, Meta(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]  # checked against the vocabulary later
# A 64-bit signed integer: what msgpack carries and torch.Generator.manual_seed takes.
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
# Below this a temperature divides logits into inf/NaN (fp16/bf16 overflow): 0 (greedy) or
# at least this. vLLM clamps to the same 1e-2; we refuse instead of silently changing it.
TEMPERATURE_FLOOR = 0.01
Temperature = Annotated[float, Meta(ge=0.0, le=100.0)]
SloMs = Annotated[float, Meta(gt=0.0, le=3.6e9)]  # at most 1000 hours
# Stop strings are matched on the coordinator's event loop for every token of the
# request, so their number and length are bounded (OpenAI allows 4).
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
StopString = Annotated[str, Meta(max_length=MAX_STOP_CHARS)]
Name = Annotated[str, Meta(max_length=256)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class GenerationRequest(msgspec.Struct, kw_only=True):
    """Sampling and extension fields shared by both endpoints.

    Fields other servers accept but this one does not implement are declared too, so
    that a non-default value is refused by name instead of silently ignored
    (see ``unsupported_fields``).
    """

    model: Name | None = None
    max_tokens: Annotated[int, Meta(ge=-INT32_MAX, le=INT32_MAX)] | None = None
    temperature: Temperature | None = None
    top_p: float | None = None
    top_k: Annotated[int, Meta(ge=-1, le=INT32_MAX)] | None = None
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=INT32_MAX)] = 1
    best_of: Count | None = None
    # /v1/completions: how many alternatives to report per token (0..20) besides the sampled one.
    logprobs: bool | Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    user: Name | None = None
    # vLLM-style extensions
    ignore_eos: bool = False
    min_tokens: Count = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM >= 0.10: output token ids (and the prompt's) alongside the text
    return_token_ids: bool = False
    # logprob tokens as "token_id:<id>" instead of text (text can be ambiguous or not valid UTF-8)
    return_tokens_as_token_ids: bool = False
    # Ascendra extensions: per-request SLOs in milliseconds
    ttft_slo_ms: SloMs | None = None
    tbt_slo_ms: SloMs | None = None
    # OpenAI's penalties in [-2, 2]; vLLM's repetition penalty, > 0 (1 = off)
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    # Accepted by OpenAI or vLLM, not implemented here: refused unless left at the default.
    length_penalty: float | None = None
    min_p: float | None = None
    logit_bias: Any = None
    guided_grammar: Any = None
    # Structured output (ascendra/structured.py): at most one of these.
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    structured_outputs: Any = None
    use_beam_search: bool = False
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None


class CompletionRequest(GenerationRequest, kw_only=True):
    prompt: str | list[int | str | list[int]]
    suffix: str | None = None


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Name
    content: str | list[TextPart] | None = None
    name: Name | None = None
    tool_calls: Any = None
    tool_call_id: Any = None


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[int, Meta(ge=-INT32_MAX, le=INT32_MAX)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Chat's form: a flag, and the number of alternatives apart.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    documents: Any = None
    modalities: Any = None
    audio: Any = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /tokenize: either a prompt (as /v1/completions tokenises it) or chat messages."""

    model: Name | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: Name | None = None
    tokens: Annotated[list[TokenId], Meta(max_length=10_000_000)]


# Field -> values that mean "not used". Anything else is refused with a 400 naming the
# field, because ignoring it would give a silently wrong answer.
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "length_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "guided_grammar": (None,),
    "use_beam_search": (False,),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # harmless without tools, which are refused
    "documents": (None, []),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "continue_final_message": (False,),
}


def unsupported_fields(req: msgspec.Struct) -> None:
    """Refuse a field this server accepts in the schema but does not implement."""
    for name, defaults in _UNSUPPORTED_DEFAULTS.items():
        if not hasattr(req, name):
            continue
        if getattr(req, name) not in defaults:
            raise APIError(f"{name} is not supported by this server; leave it unset.", param=name)


def decode_request(body: bytes, cls: type) -> Any:
    """Decode and type-check a request body; raises APIError naming the field."""
    try:
        return msgspec.json.decode(body, type=cls)
    except UnicodeDecodeError:
        raise APIError("Request body is not valid UTF-8.", param=None) from None
    except RecursionError:
        raise APIError("Request body is nested too deeply.", param=None) from None
    except msgspec.ValidationError as e:
        msg = str(e)
        param = _field_from_error(msg)
        if param is None and msg.startswith("Object missing required field"):
            m = re.search(r"`([^`]+)`", msg)
            param = m.group(1) if m else None
        raise APIError(msg, param=param) from None
    except msgspec.DecodeError as e:
        raise APIError(f"Request body is not valid JSON: {e}", param=None) from None


# One request fans out into at most this many sequences (prompts x n): each is a request of
# its own on the workers, so the bound keeps one client from filling the queue in one call.
MAX_CHOICES = 64


def validate_common(req: GenerationRequest) -> None:
    """Value checks msgspec's types cannot express. Raises APIError naming the field."""
    if req.n > MAX_CHOICES:
        raise APIError(f"n must be at most {MAX_CHOICES}, got {req.n}.", param="n")
    if req.best_of is not None and req.best_of != req.n:
        # best_of > n ranks candidates by cumulative logprob, which this server does not compute.
        raise APIError(f"best_of other than n is not supported (got best_of={req.best_of}, n={req.n}).",
                       param="best_of")
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise APIError(f"max_tokens must be at least 1, got {req.max_tokens}.", param="max_tokens")
    if req.temperature is not None and 0 < req.temperature < TEMPERATURE_FLOOR:
        raise APIError(f"temperature must be 0 (greedy) or at least {TEMPERATURE_FLOOR}, got {req.temperature}.",
                       param="temperature")
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
    unsupported_fields(req)
    logprobs_of(req)


def logprobs_of(req: GenerationRequest) -> int | None:
    """How many alternatives per token the request wants reported, or None for no logprobs.

    /v1/completions takes a number (``logprobs``: 0..20); chat a flag and a number apart
    (``logprobs: true`` with ``top_logprobs``: 0..20), as OpenAI and vLLM define them.
    """
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            return req.top_logprobs or 0
        if req.top_logprobs:
            raise APIError("top_logprobs needs logprobs set to true.", param="top_logprobs")
        return None
    if req.logprobs is True:
        raise APIError(f"logprobs on /v1/completions is the number of alternatives per token (0..{MAX_LOGPROBS}), "
                       "not a flag.", param="logprobs")
    if req.logprobs is None or req.logprobs is False:
        return None
    if req.echo:
        # The echoed prompt would need prompt logprobs, which this server does not compute.
        raise APIError("logprobs together with echo is not supported (no prompt logprobs).", param="logprobs")
    return int(req.logprobs)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return list(stop)


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: one text or token-id list, or a list of them."""
    p = req.prompt
    if isinstance(p, list) and len(p) > 1 and not any(isinstance(x, int) for x in p):
        if len(p) * req.n > MAX_CHOICES:
            raise APIError(f"{len(p)} prompts x n={req.n} is more than {MAX_CHOICES} completions in one request.",
                           param="prompt")
        return list(p)  # type: ignore[arg-type]
    return [prompt_of(req)]


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
        if m.tool_calls or m.tool_call_id is not None:
            raise APIError("Tool calls in messages are not supported.", param="messages")
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
    encode of the new text plus two byte concatenations. A request that asked for logprobs
    or token ids has those fields encoded into its chunks as well (``event``).
    """

    __slots__ = ("_head", "_mid", "_tail", "_usage_head", "_chat", "prompt_ids")

    def __init__(self, request_id: str, model: str, created: int, chat: bool, index: int = 0,
                 prompt_ids: list[int] | None = None) -> None:
        enc = msgspec.json.encode
        idx = str(index).encode()
        self._chat = chat
        obj = b'"chat.completion.chunk"' if chat else b'"text_completion"'
        top = (b'data: {"id":' + enc(request_id) + b',"object":' + obj + b',"created":'
               + str(created).encode() + b',"model":' + enc(model))
        if chat:
            self._head = top + b',"choices":[{"index":' + idx + b',"delta":{"content":'
            self._mid = b'},"logprobs":'
        else:
            self._head = top + b',"choices":[{"index":' + idx + b',"text":'
            self._mid = b',"logprobs":'
        self._tail = self._mid + b'null,"finish_reason":null}]}\n\n'
        self._usage_head = top + b',"choices":[],"usage":'
        # return_token_ids: the prompt's ids go out once, on the first chunk (vLLM's place for them:
        # the chunk for chat, the choice for completions).
        self.prompt_ids = prompt_ids

    def role(self) -> bytes:
        """Chat streams open with an assistant-role delta, as OpenAI's do."""
        head = self._head[: -len(b'"content":')] + b'"role":"assistant","content":""'
        if self.prompt_ids is None:
            return head + self._tail
        return self.event("", None, None, [], _head=head)

    def text(self, text: str) -> bytes:
        if self.prompt_ids is not None:
            return self.event(text, None, None, None)
        return self._head + msgspec.json.encode(text) + self._tail

    def final(self, text: str, finish_reason: str) -> bytes:
        return self.event(text, finish_reason, None, None)

    def event(self, text: str, finish_reason: str | None, logprobs: Any, token_ids: list[int] | None,
              _head: bytes | None = None) -> bytes:
        """A chunk with every optional part: logprobs (None: null), token_ids (None: left out)."""
        enc = msgspec.json.encode
        parts = [self._head + enc(text) if _head is None else _head, self._mid, enc(logprobs),
                 b',"finish_reason":', enc(finish_reason)]
        if token_ids is not None:
            parts += [b',"token_ids":', enc(token_ids)]
        prompt_ids, self.prompt_ids = self.prompt_ids, None
        if prompt_ids is not None and not self._chat:
            parts += [b',"prompt_token_ids":', enc(prompt_ids)]
        parts.append(b"}]")
        if prompt_ids is not None and self._chat:
            parts += [b',"prompt_token_ids":', enc(prompt_ids)]
        parts.append(b"}\n\n")
        return b"".join(parts)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._usage_head + msgspec.json.encode(usage_dict(prompt_tokens, completion_tokens)) + b"}\n\n"


DONE = b"data: [DONE]\n\n"


def sse_error(message: str, type: str, code: int | str) -> bytes:
    return b"data: " + error_body(message, type, code) + b"\n\n"


class Choice(msgspec.Struct):
    """One finished choice of a non-streaming response."""

    text: str
    finish_reason: str
    logprobs: Any = None  # the endpoint's logprobs object, or None
    token_ids: list[int] | None = None  # return_token_ids: the output ids
    prompt_token_ids: list[int] | None = None  # return_token_ids: the prompt's ids


def completion_response(
    request_id: str, model: str, created: int, text: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    return choices_response(request_id, model, created, [Choice(text, finish_reason)], prompt_tokens,
                            completion_tokens, chat=False)


def chat_response(
    request_id: str, model: str, created: int, text: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    return choices_response(request_id, model, created, [Choice(text, finish_reason)], prompt_tokens,
                            completion_tokens, chat=True)


def choices_response(
    request_id: str, model: str, created: int, choices: list[Choice],
    prompt_tokens: int, completion_tokens: int, chat: bool,
) -> bytes:
    """A non-streaming response with the choices indexed in order. return_token_ids puts the
    prompt's ids on each choice for completions and once on the response for chat, as vLLM does."""
    items: list[dict[str, Any]] = []
    for i, c in enumerate(choices):
        if chat:
            item: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": c.text}}
        else:
            item = {"index": i, "text": c.text}
        item["logprobs"] = c.logprobs
        item["finish_reason"] = c.finish_reason
        if c.token_ids is not None:
            item["token_ids"] = c.token_ids
        if c.prompt_token_ids is not None and not chat:
            item["prompt_token_ids"] = c.prompt_token_ids
        items.append(item)
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": items,
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }
    if chat and choices and choices[0].prompt_token_ids is not None:
        body["prompt_token_ids"] = choices[0].prompt_token_ids
    return msgspec.json.encode(body)


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
