"""Unit tests for the coordinator's pure pieces: detokenizer, stop strings, router, metrics, schemas."""

from __future__ import annotations

import random

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ascendra.detokenizer import DetokenizerFactory, StopChecker, WindowDetokenizer
from ascendra.messages import StepOutput
from ascendra.metrics import Histogram, ServerMetrics, exposition
from ascendra.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    decode_request,
    prompt_of,
    validate_common,
)
from ascendra.predictor import AscendraPolicy
from ascendra.router import (
    RoundRobinPolicy,
    RouteRequest,
    default_num_hp,
    least_loaded,
    plan_instances,
)
from ascendra.policies import make_policy
from tests.server_harness import parse_metrics


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.path)


# ---------------------------------------------------------------- detokenizer


def _stream_decode(det, ids, rng):
    out, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3)
        out.append(det.feed(ids[i : i + k]))
        i += k
    out.append(det.flush())
    return "".join(out)


def test_byte_level_fast_path_matches_tokenizer(tokenizer):
    factory = DetokenizerFactory(tokenizer)
    assert factory.fast, "SmolLM2's byte-level BPE should take the table path"
    rng = random.Random(0)
    texts = ["Hello, world!", "naïve café — 日本語のテキスト 🙂🙃", "  spaces\tand\nlines  ", "x" * 50]
    seqs = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    seqs += [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))] for _ in range(100)]
    for ids in seqs:
        want = tokenizer.decode(ids, skip_special_tokens=True)
        assert _stream_decode(factory.new([]), ids, rng) == want


def test_window_detokenizer_matches_tokenizer(tokenizer):
    rng = random.Random(1)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 30))]
        assert _stream_decode(WindowDetokenizer(decode, []), ids, rng) == decode(ids)


def test_multibyte_character_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    det = DetokenizerFactory(tokenizer).new([])
    pieces = [det.feed([t]) for t in ids] + [det.flush()]
    assert "".join(pieces) == "🙂"
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------- stop strings


def _run_stop(stops, pieces):
    sc = StopChecker(stops)
    out = []
    for p in pieces:
        text, matched = sc.feed(p)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(sc.flush())
    return "".join(out), False


@pytest.mark.parametrize(
    "stops,pieces,want,matched",
    [
        (["END"], ["abc E", "N", "D tail"], "abc ", True),
        (["END"], ["abc EN", "x"], "abc ENx", False),
        (["\n\n"], ["line\n", "\nmore"], "line", True),
        (["ab", "b"], ["xab"], "x", True),  # earliest match wins
        (["<stop>"], ["<", "st", "o", "p", ">"], "", True),
        (["aaa"], ["a", "a", "b", "aa", "a"], "aab", True),
        (["xyz"], ["no match here"], "no match here", False),
    ],
)
def test_stop_checker(stops, pieces, want, matched):
    assert _run_stop(stops, pieces) == (want, matched)


def test_stop_checker_never_leaks_partial_stop():
    rng = random.Random(2)
    alphabet = "ab"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        got, matched = _run_stop([stop], pieces)
        i = text.find(stop)
        assert (got, matched) == ((text[:i], True) if i >= 0 else (text, False))


# ---------------------------------------------------------------- router


def _req(i, n=10):
    return RouteRequest(f"r{i}", n, 16, 0.0)


def test_plan_instances_roles():
    assert [s.role for s in plan_instances("vllm", 3)] == ["mixed"] * 3
    assert [s.policy for s in plan_instances("sarathi", 2)] == ["sarathi"] * 2
    specs = plan_instances("ascendra", 3)
    assert [(s.role, s.policy) for s in specs] == [("lp", "lp"), ("lp", "lp"), ("hp", "hp")]
    assert [s.role for s in plan_instances("ascendra", 6, 2)] == ["lp"] * 4 + ["hp"] * 2
    assert [s.role for s in plan_instances("ascendra", 1)] == ["lp"]
    assert default_num_hp(1) == 0 and default_num_hp(2) == 1 and default_num_hp(9) == 3
    with pytest.raises(ValueError):
        plan_instances("ascendra", 2, 2)
    with pytest.raises(ValueError):
        plan_instances("fifo", 2)


def test_round_robin_skips_dead_instances():
    pol = RoundRobinPolicy(plan_instances("vllm", 3))
    for i in range(3):
        pol.set_alive(i, True)
    assert [pol.route(_req(i)) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    pol.set_alive(1, False)
    assert [pol.route(_req(i)) for i in range(4)] == [0, 2, 0, 2]
    for i in range(3):
        pol.set_alive(i, False)
    assert pol.route(_req(9)) is None


def test_least_loaded_and_bookkeeping():
    pol = make_policy("ascendra", plan_instances("ascendra", 3))
    assert isinstance(pol, AscendraPolicy)
    for i in range(3):
        pol.set_alive(i, True)
    # The HP instance has queued work, so it holds no ticket for new requests.
    pol.on_step(2, StepOutput(2, 1, [], 0, 0, 0, 0, 0, 0.0, 0, 1, 0, 100, 100, 0.5))
    picks = []
    for i in range(4):
        r = _req(i)
        wid = pol.route(r)
        picks.append(wid)
        pol.on_dispatch(wid, r)
    assert picks == [0, 1, 0, 1]  # LP instances only, least loaded first
    assert pol.instances[0].num_assigned == 2 and pol.instances[0].num_unstarted == 2
    pol.on_first_token("r0")
    pol.on_finish("r0")
    pol.on_finish("r2")
    assert pol.instances[0].num_assigned == 0 and pol.instances[0].unstarted_prompt_tokens == 0
    assert pol.route(_req(5)) == 0
    # Every LP instance gone: the HP instance still serves.
    pol.set_alive(0, False)
    pol.set_alive(1, False)
    assert pol.route(_req(6)) == 2
    step = StepOutput(0, 1, [], 0, 0, 0, 0, 0, 0.0, 3, 1, 0, 50, 100, 1.0)
    assert pol.on_step(2, step) == []
    assert pol.instances[2].kv_usage == 0.5 and pol.instances[2].num_running == 3


def test_least_loaded_prefers_less_queued_prefill():
    pol = make_policy("vllm", plan_instances("vllm", 2))
    for i in range(2):
        pol.set_alive(i, True)
    pol.on_dispatch(0, _req(0, n=1000))
    pol.on_dispatch(1, _req(1, n=10))
    assert least_loaded(pol.instances).instance_id == 1


# ---------------------------------------------------------------- metrics


def test_histogram_and_render():
    h = Histogram("x_seconds", "help", [0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    h.observe_many(0.5, 3)
    m = parse_metrics(exposition([h]))
    assert m['ascendra:x_seconds_bucket{le="0.1"}'] == 2  # bounds are inclusive
    assert m['ascendra:x_seconds_bucket{le="1.0"}'] == 6
    assert m['ascendra:x_seconds_bucket{le="+Inf"}'] == 7
    assert m["ascendra:x_seconds_count"] == 7
    assert m["ascendra:x_seconds_sum"] == pytest.approx(0.05 + 0.1 + 0.5 + 2.0 + 1.5)
    sm = ServerMetrics()
    sm.kv_usage.set(0.25, "0")
    sm.success.inc(1, "stop")
    sm.generation_tokens.inc(5)
    out = sm.render()
    m = parse_metrics(out)
    assert m['ascendra:kv_cache_usage_perc{instance="0"}'] == 0.25
    assert m['ascendra:request_success_total{finished_reason="stop"}'] == 1
    assert m['ascendra:slo_requests_total{result="met"}'] == 0
    assert m["ascendra:generation_tokens_total"] == 5
    assert m["ascendra:coordinator_requests_inflight"] == 0  # unlabelled gauges read 0 before any set
    assert "# TYPE ascendra:time_to_first_token_seconds histogram" in out
    families = {f.name: f.type for f in text_string_to_metric_families(out)}
    assert len(families) == len(sm.all())
    assert families["ascendra:escalations"] == "counter"


# ---------------------------------------------------------------- request schemas


def _bad(body: bytes, cls=CompletionRequest) -> APIError:
    with pytest.raises(APIError) as e:
        req = decode_request(body, cls)
        validate_common(req)
        if cls is CompletionRequest:
            prompt_of(req)
    return e.value


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "x", "n": 65}', "n"),
        (b'{"prompt": "x", "n": 2, "best_of": 3}', "best_of"),
        (b'{"prompt": "x", "temperature": -1}', "temperature"),
        (b'{"prompt": "x", "top_p": 0}', "top_p"),
        (b'{"prompt": "x", "stop": 5}', "stop"),
        (b'{"prompt": "x", "stop": [""]}', "stop"),
        (b'{"prompt": [1.5]}', "prompt"),
        (b'{"prompt": ["a", "b"]}', "prompt"),
        (b'{"max_tokens": 3}', "prompt"),
        (b'{"prompt": "x", "stream": "yes"}', "stream"),
        (b'{"prompt": "x", "min_tokens": 5, "max_tokens": 2}', "min_tokens"),
        (b'{"prompt": "x", "ttft_slo_ms": 0}', "ttft_slo_ms"),
    ],
)
def test_validation_names_the_field(body, param):
    err = _bad(body)
    assert err.status == 400 and err.param == param, err.message


def test_malformed_json():
    err = _bad(b'{"prompt": ')
    assert err.status == 400 and err.param is None
    err = _bad(b'[1, 2]')
    assert err.status == 400


def test_chat_schema():
    req = decode_request(
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 4}',
        ChatCompletionRequest,
    )
    assert req.messages[0].content[0].text == "hi" and req.max_completion_tokens == 4
    assert _bad(b'{"messages": "hi"}', ChatCompletionRequest).param == "messages"


def test_prompt_forms():
    assert prompt_of(decode_request(b'{"prompt": [1, 2, 3]}', CompletionRequest)) == [1, 2, 3]
    assert prompt_of(decode_request(b'{"prompt": ["hi"]}', CompletionRequest)) == "hi"
    assert prompt_of(decode_request(b'{"prompt": [[4, 5]]}', CompletionRequest)) == [4, 5]


def test_chunk_writer_is_valid_json():
    cw = ChunkWriter("cmpl-1", "tiny", 123, chat=False)
    ev = msgspec.json.decode(cw.text('he said "hi"\n')[6:])
    assert ev["choices"][0]["text"] == 'he said "hi"\n' and ev["object"] == "text_completion"
    ev = msgspec.json.decode(cw.final("", "length")[6:])
    assert ev["choices"][0]["finish_reason"] == "length"
    ev = msgspec.json.decode(cw.usage(3, 4)[6:])
    assert ev["choices"] == [] and ev["usage"]["total_tokens"] == 7
    chat = ChunkWriter("chatcmpl-1", "tiny", 123, chat=True)
    ev = msgspec.json.decode(chat.role()[6:])
    assert ev["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    ev = msgspec.json.decode(chat.final("x", "stop")[6:])
    assert ev["choices"][0]["delta"] == {"content": "x"} and ev["choices"][0]["finish_reason"] == "stop"
