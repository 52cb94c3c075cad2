"""The OpenAI-compatible server end to end: one `--model tiny --num-instances 2` server per module."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.helpers import wait_until
from tests.server_harness import ServerProcess, parse_metrics, sse_events

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    step_log = tmp_path_factory.mktemp("steps") / "steps.jsonl"
    srv = ServerProcess("--model", "tiny", "--num-instances", "2", "--max-model-len", "1024", "--step-log", str(step_log))
    srv.step_log = step_log
    yield srv
    srv.stop()


def _texts(events, chat=False):
    out = []
    for ev in events:
        if ev == "[DONE]" or not ev["choices"]:
            continue
        ch = ev["choices"][0]
        out.append(ch["delta"].get("content") or "" if chat else ch["text"])
    return "".join(out)


def _stream(server, path, body):
    status, headers, raw = server.request("POST", path, dict(body, stream=True))
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    return events


# ---------------------------------------------------------------- basics


def test_models_and_health(server):
    status, body = server.health()
    assert status == 200 and body["status"] == "ok"
    assert [w["alive"] for w in body["workers"]] == [True, True]
    status, _, raw = server.request("GET", "/v1/models")
    models = json.loads(raw)
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_completion_non_streaming(server):
    status, body = server.post("/v1/completions", {"model": "tiny", "prompt": "Hello there", "max_tokens": 7,
                                                   "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and isinstance(choice["text"], str) and choice["text"]
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


def test_completion_streaming_matches_non_streaming(server):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    _, whole = server.post("/v1/completions", body)
    events = _stream(server, "/v1/completions", body)
    chunks = [e for e in events if e != "[DONE]"]
    assert all(e["object"] == "text_completion" for e in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert _texts(events) == whole["choices"][0]["text"]
    assert len({e["id"] for e in chunks}) == 1


def test_prompt_as_token_ids(server):
    status, body = server.post("/v1/completions", {"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 3,
                                                   "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 3


def test_usage_chunk(server):
    events = _stream(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True,
                                                 "stream_options": {"include_usage": True}})
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert all("usage" not in e for e in events[:-2])


def test_chat_non_streaming_and_streaming(server):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
            "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, whole = server.post("/v1/chat/completions", body)
    assert status == 200, whole
    assert whole["object"] == "chat.completion"
    msg = whole["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert whole["usage"]["completion_tokens"] == 6
    events = _stream(server, "/v1/chat/completions", dict(body, stream_options={"include_usage": True}))
    first = events[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["usage"]["completion_tokens"] == 6
    assert _texts(events, chat=True) == msg["content"]
    finals = [e for e in events[:-2] if e["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"


def test_chat_max_completion_tokens(server):
    status, body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "max_completion_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "Sampling", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
            "seed": 1234, "ignore_eos": True}
    a = server.post("/v1/completions", body)[1]["choices"][0]["text"]
    b = server.post("/v1/completions", body)[1]["choices"][0]["text"]
    assert a == b


# ---------------------------------------------------------------- stop strings


def _boundary_stop(server):
    """A stop string that straddles a token boundary of the greedy continuation."""
    body = {"prompt": "The weather today", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    # Token boundaries from greedy prefixes of every length: deterministic, unlike SSE chunking
    # (a busy server may put several tokens in one event).
    prefixes = [server.post("/v1/completions", dict(body, max_tokens=k))[1]["choices"][0]["text"]
                for k in range(1, 25)]
    full = prefixes[-1]
    pieces = [b[len(a):] for a, b in zip([""] + prefixes, prefixes)]
    pos = 0
    for a, b in zip(pieces, pieces[1:]):
        pos += len(a)
        if len(a) >= 2 and len(b) >= 2 and pos >= 4:
            stop = a[-2:] + b[:2]
            if full.find(stop) == pos - 2:  # first occurrence is the straddling one
                return body, full, stop
    pytest.skip("no two adjacent multi-character tokens in the greedy continuation")


def test_stop_string_across_token_boundary(server):
    body, full, stop = _boundary_stop(server)
    want = full[: full.find(stop)]
    status, res = server.post("/v1/completions", dict(body, stop=[stop, "never-appears-zzz"]))
    assert status == 200, res
    assert res["choices"][0]["text"] == want
    assert res["choices"][0]["finish_reason"] == "stop"
    assert res["usage"]["completion_tokens"] < 24
    events = _stream(server, "/v1/completions", dict(body, stop=stop))
    assert _texts(events) == want
    chunks = [e for e in events if e != "[DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The held-back prefix of the stop string never reached the client.
    assert all(stop[:2] not in e["choices"][0]["text"] or e["choices"][0]["text"].find(stop[:2]) < len(want)
               for e in chunks)


def test_stop_string_in_chat(server):
    body = {"messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    full = server.post("/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]
    if len(full) < 6:
        pytest.skip("continuation too short")
    stop = full[3:6]
    res = server.post("/v1/chat/completions", dict(body, stop=stop))[1]
    assert res["choices"][0]["message"]["content"] == full[: full.find(stop)]
    assert res["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- the official client


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = client.models.list()
    assert models.data[0].id == "tiny"
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == c.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


# ---------------------------------------------------------------- concurrency


async def _stream_count(session, url, max_tokens):
    body = {"prompt": "Count with me:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    return events


async def test_fifty_concurrent_streams(server):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        results = await asyncio.gather(*(_stream_count(s, server.url, 10 + i % 7) for i in range(50)))
    for i, events in enumerate(results):
        assert events[-2]["usage"]["completion_tokens"] == 10 + i % 7
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    status, body = server.health()
    assert status == 200 and body["requests_inflight"] == 0


# ---------------------------------------------------------------- disconnects


def _idle(server) -> bool:
    m = parse_metrics(server.metrics())
    return (
        all(m[f'ascendra:num_requests_running{{instance="{i}"}}'] == 0 for i in (0, 1))
        and all(m[f'ascendra:kv_cache_usage_perc{{instance="{i}"}}'] == 0 for i in (0, 1))
        and m["ascendra:coordinator_requests_inflight"] == 0
    )


async def test_client_disconnect_frees_blocks(server):
    assert wait_until(lambda: _idle(server), timeout=60)
    before = parse_metrics(server.metrics())['ascendra:request_success_total{finished_reason="abort"}']
    body = {"prompt": "A long story:", "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:
        for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {})):
            if path.endswith("chat/completions"):
                req = {k: v for k, v in body.items() if k != "prompt"}
                req["messages"] = [{"role": "user", "content": "A long story:"}]
            else:
                req = dict(body, **extra)
            resp = await s.post(server.url + path, json=req)
            assert resp.status == 200
            got = 0
            async for line in resp.content:
                if line.startswith(b"data: ") and b'"content":""' not in line:
                    got += 1
                    if got >= 3:
                        break
            m = parse_metrics(server.metrics())
            assert sum(m[f'ascendra:num_requests_running{{instance="{i}"}}'] for i in (0, 1)) >= 1
            resp.close()  # drop the connection mid-stream
    assert wait_until(lambda: _idle(server), timeout=60), server.metrics()
    after = parse_metrics(server.metrics())['ascendra:request_success_total{finished_reason="abort"}']
    assert after - before == 2


async def test_non_streaming_client_disconnect_aborts(server):
    assert wait_until(lambda: _idle(server), timeout=60)
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(s.post(server.url + "/v1/completions",
                                            json={"prompt": "x", "max_tokens": 900, "ignore_eos": True}))
        # Wait (without blocking the loop) until the request is running, then give up on it.
        for _ in range(600):
            if parse_metrics(server.metrics())["ascendra:coordinator_requests_inflight"] >= 1:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert wait_until(lambda: _idle(server), timeout=60), server.metrics()


# ---------------------------------------------------------------- bad input


BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", b'not json at all', 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": ["a"] * 40, "n": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 1500, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-17"}, 404, "model"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 65}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, res = server.post(path, None if raw else body, raw=raw)
    assert got == status, res
    err = res["error"]
    assert err["message"] and err["param"] == param
    assert err["type"] == ("NotFoundError" if status == 404 else "invalid_request_error")
    assert err["code"] in (status, "context_length_exceeded")
    # ...and the server keeps serving.
    ok, res = server.post("/v1/completions", {"prompt": "still there?", "max_tokens": 2, "ignore_eos": True})
    assert ok == 200 and res["usage"]["completion_tokens"] == 2


def test_bad_input_streaming_gets_json_error(server):
    status, _, raw = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0, "stream": True})
    assert status == 400 and json.loads(raw)["error"]["param"] == "max_tokens"


# ---------------------------------------------------------------- metrics


def test_step_log_records_each_step(server):
    before = len(server.step_log.read_text().splitlines()) if server.step_log.exists() else 0
    status, body = server.post("/v1/completions", {"prompt": "one two three four five", "max_tokens": 4,
                                                   "ignore_eos": True})
    assert status == 200, body
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert wait_until(lambda: len(server.step_log.read_text().splitlines()) >= before + 4, timeout=30)
    rows = [json.loads(line) for line in server.step_log.read_text().splitlines()[before:]]
    assert {"worker", "prefill", "pairs", "decode", "decode_context", "step_time", "end", "received", "running",
            "waiting"} <= set(rows[0])
    assert all(r["step_time"] > 0 and r["end"] <= r["received"] and r["prefill"] + r["decode"] > 0 for r in rows)
    mine = [r for r in rows if r["worker"] == rows[0]["worker"]]
    assert sum(r["prefill"] for r in mine) == prompt_tokens  # one chunk, then three decodes
    assert [r["decode"] for r in mine[1:4]] == [1, 1, 1]


def test_metrics(server):
    server.post("/v1/completions", {"prompt": "metrics", "max_tokens": 3, "ignore_eos": True,
                                    "ttft_slo_ms": 600000, "tbt_slo_ms": 600000})
    status, headers, raw = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    m = parse_metrics(text)
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert f"# TYPE ascendra:{name} histogram" in text
        assert m[f"ascendra:{name}_count"] >= 1
    assert m["ascendra:time_to_first_token_seconds_count"] == m['ascendra:time_to_first_token_seconds_bucket{le="+Inf"}']
    assert m["ascendra:generation_tokens_total"] >= 3 and m["ascendra:prompt_tokens_total"] >= 1
    assert m['ascendra:slo_requests_total{result="met"}'] >= 1
    assert m['ascendra:request_success_total{finished_reason="length"}'] >= 1
    for i in (0, 1):
        for g in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert f'ascendra:{g}{{instance="{i}"}}' in m
    assert m['ascendra:request_rejected_total{reason="invalid"}'] >= 1  # test_bad_input ran first
    assert "# TYPE ascendra:process_cpu_seconds_total counter" in text
    assert m["ascendra:process_cpu_seconds_total"] > 0


# ---------------------------------------------------------------- vLLM's utility endpoints and penalties


def test_tokenize_and_detokenize_round_trip(server):
    from transformers import AutoTokenizer

    from ascendra.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny").path)
    status, body = server.post("/tokenize", {"prompt": "Hello there, world"})
    assert status == 200, body
    assert body["tokens"] == tok.encode("Hello there, world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    status, body2 = server.post("/tokenize", {"prompt": "Hello", "add_special_tokens": False,
                                              "return_token_strs": True})
    assert body2["tokens"] == tok.encode("Hello", add_special_tokens=False)
    assert body2["token_strs"] == tok.convert_ids_to_tokens(body2["tokens"])
    status, back = server.post("/detokenize", {"tokens": tok.encode("Hello there, world", add_special_tokens=False)})
    assert status == 200 and back == {"prompt": "Hello there, world"}
    # Chat messages tokenise as /v1/chat/completions counts them in its usage.
    msgs = [{"role": "user", "content": "Say hi"}]
    status, chat = server.post("/tokenize", {"messages": msgs})
    status, done = server.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert chat["count"] == done["usage"]["prompt_tokens"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
    ("/detokenize", {"tokens": [10_000_000]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenize_errors_name_the_field(server, path, body, param):
    status, err = server.post(path, body)
    assert status in (400, 404) and err["error"]["param"] == param, err


def test_version_and_ping(server):
    status, _, raw = server.request("GET", "/version")
    assert status == 200 and json.loads(raw)["version"]
    for method in ("GET", "POST"):
        status, _, _ = server.request(method, "/ping")
        assert status == 200


def test_penalties_are_applied_not_ignored(server):
    base = {"prompt": "Hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    _, plain = server.post("/v1/completions", base)
    # Pulling hard towards repeats changes a greedy completion of the random-weight model.
    _, pulled = server.post("/v1/completions", dict(base, presence_penalty=-2.0, repetition_penalty=0.2))
    _, again = server.post("/v1/completions", dict(base, presence_penalty=-2.0, repetition_penalty=0.2))
    assert plain["choices"][0]["text"] != pulled["choices"][0]["text"]
    assert pulled["choices"][0]["text"] == again["choices"][0]["text"]


# ---------------------------------------------------------------- n, prompt lists, echo


def test_n_samples_and_prompt_lists_match_single_requests(server):
    base = {"max_tokens": 6, "ignore_eos": True, "temperature": 0.8, "seed": 11}
    _, many = server.post("/v1/completions", dict(base, prompt=["Hello", "The sky is"], n=2))
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["usage"]["completion_tokens"] == 4 * 6
    # Choice i*n + j is prompt i, sample j: sample 0 is what the request alone gives; sample 1
    # draws from another stream.
    for i, prompt in enumerate(["Hello", "The sky is"]):
        _, one = server.post("/v1/completions", dict(base, prompt=prompt))
        assert many["choices"][2 * i]["text"] == one["choices"][0]["text"]
        assert many["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]
    assert many["choices"][0]["text"] != many["choices"][1]["text"]
    # Token-id prompt lists are lists of lists.
    _, ids = server.post("/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "temperature": 0,
                                             "ignore_eos": True})
    assert len(ids["choices"]) == 2 and ids["usage"]["prompt_tokens"] == 5


def test_n_streams_merge_with_choice_indices(server):
    body = {"prompt": ["Hello", "Once upon"], "n": 2, "max_tokens": 5, "ignore_eos": True, "temperature": 0.7,
            "seed": 3, "stream_options": {"include_usage": True}}
    events = _stream(server, "/v1/completions", body)
    assert events.count("[DONE]") == 1
    texts: dict[int, str] = {}
    finished = set()
    for ev in events[:-1]:
        if not ev["choices"]:
            usage = ev["usage"]
            continue
        ch = ev["choices"][0]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
        if ch["finish_reason"]:
            finished.add(ch["index"])
    assert finished == {0, 1, 2, 3}
    assert usage["completion_tokens"] == 20
    _, whole = server.post("/v1/completions", dict(body, stream=False))
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]
    # Chat: n choices, each opened by its own role delta.
    events = _stream(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                      "max_tokens": 3, "ignore_eos": True})
    roles = [ev["choices"][0]["index"] for ev in events[:-1] if ev["choices"] and "role" in ev["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1, 2]


def test_echo_prepends_the_prompt(server):
    body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    _, plain = server.post("/v1/completions", body)
    _, echoed = server.post("/v1/completions", dict(body, echo=True))
    assert echoed["choices"][0]["text"] == "Hello there" + plain["choices"][0]["text"]
    assert _texts(_stream(server, "/v1/completions", dict(body, echo=True))) == echoed["choices"][0]["text"]
    _, ids = server.post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "temperature": 0})
    _, detok = server.post("/detokenize", {"tokens": [5, 6, 7]})
    assert ids["choices"][0]["text"].startswith(detok["prompt"])
