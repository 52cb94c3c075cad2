"""Structured output: response_format (json_schema, json_object), guided_json, guided_regex and
guided_choice, served for real (outlines-core automata masking each step), refused with a 400
naming the field when malformed or combined with what a guide cannot honour."""

from __future__ import annotations

import json
import re
import time

import pytest
from transformers import AutoTokenizer

from ascendra.messages import AddRequest
from ascendra.protocol import APIError, ChatCompletionRequest, CompletionRequest
from ascendra.structured import escape, guide_regex, json_object_regex
from tests.runtime_utils import greedy, make_engine

# A finite language: whatever the random-weight tiny model prefers, the output completes.
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"]}
PROMPT = [5, 6, 7, 8, 9, 10, 11]


def _req(**fields) -> CompletionRequest:
    return CompletionRequest(prompt="hi", **fields)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model.path)


# ---------------------------------------------------------------- the request fields -> one regex


def test_each_field_gives_its_regex():
    assert guide_regex(_req()) is None
    assert guide_regex(_req(response_format={"type": "text"})) is None
    schema = guide_regex(_req(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}))
    assert schema == guide_regex(_req(guided_json=SCHEMA)) == guide_regex(_req(guided_json=json.dumps(SCHEMA)))
    assert re.fullmatch(schema, '{"color": "red", "ok": true}') and not re.fullmatch(schema, '{"color": "pink", "ok": true}')
    obj = guide_regex(_req(response_format={"type": "json_object"}))
    assert obj == json_object_regex()
    for text in ('{}', '{"a": 1, "b": [true, null, "x"], "c": -2.5e+3}'):
        assert re.fullmatch(obj, text), text
    assert not re.fullmatch(obj, '[1, 2]')
    choice = guide_regex(_req(guided_choice=["a+b", "(x)", "plain"]))
    assert [c for c in ("a+b", "(x)", "plain", "ab") if re.fullmatch(choice, c)] == ["a+b", "(x)", "plain"]
    assert guide_regex(_req(guided_regex="[0-9]{3}")) == "[0-9]{3}"
    # vLLM >= 0.11's one field for all of them.
    assert guide_regex(_req(structured_outputs={"json": SCHEMA})) == schema
    assert guide_regex(_req(structured_outputs={"choice": ["a+b", "(x)", "plain"]})) == choice
    assert guide_regex(_req(structured_outputs={"regex": "[0-9]{3}"})) == "[0-9]{3}"
    assert guide_regex(_req(structured_outputs={"json_object": True})) == obj
    tight = guide_regex(_req(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}))
    assert re.fullmatch(tight, '{"color":"red","ok":true}') and not re.fullmatch(tight, '{"color": "red", "ok": true}')
    spaced = guide_regex(_req(structured_outputs={"json_object": True, "whitespace_pattern": "[ ]{0,2}"}))
    assert re.fullmatch(spaced, '{  "a":  1}')
    assert escape("1.5*") == r"1\.5\*"


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": [1, 2]}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos"),
    ({"guided_choice": ["a"], "min_tokens": 2}, "min_tokens"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"jsn": SCHEMA}}, "structured_outputs.jsn"),
    ({"structured_outputs": {"json": SCHEMA}, "guided_json": SCHEMA}, "structured_outputs"),
])
def test_malformed_or_conflicting_fields_name_the_field(fields, param):
    with pytest.raises(APIError) as e:
        guide_regex(_req(**fields))
    assert e.value.param == param, str(e.value)


def test_chat_requests_take_the_same_fields():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"})
    assert guide_regex(req) == json_object_regex()


# ---------------------------------------------------------------- the worker: masks, replay, errors


def _text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_engine_output_follows_the_schema_and_ends_with_it(tiny_model, tokenizer):
    """Random weights would never write JSON by themselves: every output here is the guide's doing."""
    engine = make_engine(tiny_model)
    prompts = [PROMPT, PROMPT[::-1], [3] * 20]
    regex = guide_regex(_req(guided_json=SCHEMA))
    choice = guide_regex(_req(guided_choice=["yes", "no", "maybe later"]))
    from tests.runtime_utils import run_all

    params = [greedy(60, guided_regex=regex), greedy(60, guided_regex=choice), greedy(60, guided_regex=regex)]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert engine.add_request(AddRequest(f"r{i}", p, sp, time.monotonic())) is None
    ids: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    reasons = {}
    while engine.has_work():
        for o in engine.step().outputs:
            ids[o.request_id] += o.new_token_ids
            if o.finish_reason:
                reasons[o.request_id] = o.finish_reason
    assert reasons == {"r0": "stop", "r1": "stop", "r2": "stop"}, reasons
    for rid in ("r0", "r2"):
        doc = json.loads(_text(tokenizer, ids[rid]))
        assert doc["color"] in ("red", "green", "blue") and isinstance(doc["ok"], bool)
    assert _text(tokenizer, ids["r1"]) in ("yes", "no", "maybe later")
    assert not engine.guides._guides  # every finished request's guide is gone
    # Unguided, the same prompt is not JSON: the mask did the work.
    free, _ = run_all(make_engine(tiny_model), [PROMPT], greedy(20))
    with pytest.raises(json.JSONDecodeError):
        json.loads(_text(tokenizer, free[0]))


def test_a_request_resumed_mid_output_continues_from_the_same_state(tiny_model):
    """An escalated or resumed request arrives with tokens already made: its guide replays them,
    so the continuation equals the uninterrupted run's (greedy)."""
    regex = guide_regex(_req(guided_json=SCHEMA))
    engine = make_engine(tiny_model)
    assert engine.add_request(AddRequest("a", PROMPT, greedy(60, guided_regex=regex), time.monotonic())) is None
    whole: list[int] = []
    while engine.has_work():
        for o in engine.step().outputs:
            whole += o.new_token_ids
    assert len(whole) > 6
    cut = 5
    resumed = make_engine(tiny_model)
    req = AddRequest("b", PROMPT, greedy(60 - cut, guided_regex=regex), time.monotonic(), output_token_ids=whole[:cut])
    assert resumed.add_request(req) is None
    rest: list[int] = []
    while resumed.has_work():
        for o in resumed.step().outputs:
            rest += o.new_token_ids
    assert whole[:cut] + rest == whole


def test_a_regex_the_worker_cannot_compile_fails_that_request_alone(tiny_model):
    """The coordinator refuses such a regex with a 400; a request reaching a worker anyway (another
    client of the ZeroMQ contract) ends with the reason, and its batch-mate is served."""
    engine = make_engine(tiny_model)
    engine.add_request(AddRequest("bad", PROMPT, greedy(8, guided_regex="("), time.monotonic()))
    engine.add_request(AddRequest("good", PROMPT, greedy(4, guided_regex="(yes|no)"), time.monotonic()))
    out: dict[str, list] = {"bad": [], "good": []}
    while engine.has_work():
        for o in engine.step().outputs:
            out[o.request_id].append(o)
    assert out["good"][-1].finish_reason == "stop"
    assert out["bad"][-1].finish_reason == "error" and "structured output" in out["bad"][-1].error
    assert not engine.guides._guides


# ---------------------------------------------------------------- through a real --model tiny server


@pytest.fixture(scope="module")
def srv():
    from tests.server_harness import ServerProcess

    s = ServerProcess("--model", "tiny", "--num-instances", "2", "--policy", "ascendra",
                      "--force-escalation-after", "3", "--max-model-len", "512", "--dtype", "float32")
    yield s
    s.stop()


@pytest.mark.e2e
def test_server_chat_json_schema_streamed_and_not(srv):
    from tests.server_harness import sse_events

    body = dict(messages=[{"role": "user", "content": "a color"}], max_tokens=60, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    status, res = srv.post("/v1/chat/completions", body)
    assert status == 200, res
    content = res["choices"][0]["message"]["content"]
    doc = json.loads(content)
    assert doc["color"] in ("red", "green", "blue") and isinstance(doc["ok"], bool)
    assert res["choices"][0]["finish_reason"] == "stop"
    status, _, raw = srv.request("POST", "/v1/chat/completions", dict(body, stream=True))
    assert status == 200
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(raw)[:-1] if e["choices"])
    assert streamed == content  # the same greedy output, escalated after 3 tokens both times


@pytest.mark.e2e
def test_server_completions_choice_json_object_and_sampling(srv):
    status, res = srv.post("/v1/completions", dict(prompt=PROMPT, max_tokens=10, temperature=0,
                                                   guided_choice=["alpha", "beta"]))
    assert status == 200, res
    assert res["choices"][0]["text"] in ("alpha", "beta")
    status, res = srv.post("/v1/completions", dict(prompt=PROMPT, max_tokens=60, temperature=0,
                                                   structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}))
    assert status == 200, res
    assert " " not in res["choices"][0]["text"] and json.loads(res["choices"][0]["text"])["color"] in ("red", "green", "blue")
    status, res = srv.post("/v1/completions", dict(prompt=PROMPT, max_tokens=200, temperature=1.0, seed=3, n=3,
                                                   response_format={"type": "json_object"}))
    assert status == 200, res
    for ch in res["choices"]:
        if ch["finish_reason"] == "stop":  # sampled JSON may also run out of max_tokens inside a string
            assert isinstance(json.loads(ch["text"]), dict)
        else:
            assert ch["finish_reason"] == "length"


@pytest.mark.e2e
def test_server_refuses_a_bad_schema_naming_the_field(srv):
    status, res = srv.post("/v1/chat/completions", dict(
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}))
    assert status == 400 and res["error"]["param"] == "response_format.json_schema.schema", res
    status, res = srv.post("/v1/completions", dict(prompt="x", guided_regex="(", max_tokens=4))
    assert status == 400 and res["error"]["param"] == "guided_regex", res
