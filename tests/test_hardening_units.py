"""Pure pieces of issue 11: stop matching with many stop strings, request bounds, unsupported fields."""

from __future__ import annotations

import random

import pytest

from ascendra.detokenizer import StopChecker
from ascendra.protocol import (
    MAX_STOP_STRINGS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
    decode_request,
    validate_common,
)


def _reference(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """The text a client must see: it ends before the earliest stop in the text received
    up to the first piece that completes any stop string."""
    text = ""
    for p in pieces:
        text += p
        hits = [i for i in (text.find(s) for s in stops) if i != -1]
        if hits:
            return text[: min(hits)], True
    return text, False


def _streamed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    sc = StopChecker(stops)
    out = []
    for p in pieces:
        text, matched = sc.feed(p)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(sc.flush())
    return "".join(out), False


def test_stop_checker_matches_reference_with_many_overlapping_stops():
    rng = random.Random(7)
    alphabet = "abc "
    for _ in range(400):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(MAX_STOP_STRINGS)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 4)
            pieces.append(text[i : i + n])
            i += n
        assert _streamed(stops, pieces) == _reference(stops, pieces), (stops, pieces)


def test_stop_checker_holds_back_only_a_possible_stop_start():
    sc = StopChecker(["<|end|>", "STOP"])
    assert sc.feed("hello <|e") == ("hello ", False)
    assert sc.feed("nd|") == ("", False)
    assert sc.feed("> more") == ("", True)
    sc = StopChecker(["<|end|>"])
    assert sc.feed("a <|x") == ("a <|x", False)  # "<|x" cannot start "<|end|>"


def _err(body: bytes, cls=CompletionRequest) -> APIError:
    with pytest.raises(APIError) as e:
        validate_common(decode_request(body, cls))
    return e.value


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": "x", "seed": 9223372036854775808}', "seed"),
    (b'{"prompt": "x", "top_k": 99999999999999999999999}', "top_k"),
    (b'{"prompt": "x", "stop_token_ids": [1, 99999999999999999999]}', "stop_token_ids"),
    (b'{"prompt": "x", "stop_token_ids": [-1]}', "stop_token_ids"),
    (b'{"prompt": "x", "temperature": 0.001}', "temperature"),
    (b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    (b'{"prompt": "x", "tbt_slo_ms": 1e999}', "tbt_slo_ms"),
    (b'{"prompt": "x", "presence_penalty": 2.01}', "presence_penalty"),
    (b'{"prompt": "x", "repetition_penalty": -1}', "repetition_penalty"),
    (b'{"prompt": "x", "use_beam_search": true}', "use_beam_search"),
    (b'{"prompt": "x", "skip_special_tokens": "no"}', "skip_special_tokens"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "x", "logprobs": -1}', "logprobs"),
    (b'{"prompt": "x", "logprobs": true}', "logprobs"),
    (b'{"prompt": "x", "logprobs": 2, "echo": true}', "logprobs"),
    (b'{"prompt": "x", "prompt_logprobs": 1}', "prompt_logprobs"),
    (b'{"prompt": "x", "return_token_ids": 1}', "return_token_ids"),
    (b'{"prompt": "x", "guided_grammar": "root ::= x"}', "guided_grammar"),
])
def test_bounds_name_the_field(body, param):
    err = _err(body)
    assert err.status == 400 and err.param == param, err.message


def test_bounds_accept_the_edges():
    for body in (b'{"prompt": "x", "seed": -9223372036854775808}', b'{"prompt": "x", "seed": 9223372036854775807}',
                 b'{"prompt": "x", "temperature": 0}', b'{"prompt": "x", "temperature": 0.01}',
                 b'{"prompt": "x", "top_k": -1}', b'{"prompt": "x", "presence_penalty": 0.0}',
                 b'{"prompt": "x", "repetition_penalty": 1}', b'{"prompt": "x", "presence_penalty": -2}',
                 b'{"prompt": "x", "frequency_penalty": 2}', b'{"prompt": "x", "repetition_penalty": 1.3}', b'{"prompt": "x", "stop": ["a", "b"]}'):
        validate_common(decode_request(body, CompletionRequest))
    validate_common(decode_request(b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "none", '
                                   b'"response_format": {"type": "text"}}', ChatCompletionRequest))


def test_tool_messages_are_refused():
    req = decode_request(b'{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]}',
                         ChatCompletionRequest)
    with pytest.raises(APIError) as e:
        chat_messages(req)
    assert e.value.param == "messages"


def test_malformed_bodies_are_400_without_exception_text():
    for body in (b'{"prompt": "\xff\xfe"}', b'{"prompt": "x", "logprobs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        err = _err(body)
        assert err.status == 400 and "Error" not in err.message
