"""The request fields vLLM users send, each served for real: logprobs / top_logprobs,
return_token_ids, include_stop_str_in_output, skip_special_tokens, max_completion_tokens.

Logprobs are checked against transformers' reference: log_softmax of the logits the HF model
computes for the same tokens, in process (the engine) and through a real ``--model tiny`` server.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from ascendra.messages import AddRequest, SamplingParams
from tests.runtime_utils import greedy, make_engine
from workers.sampler import PendingLogprobs, Sampler

TOL = 2e-3  # fp32 forward of the paged runtime vs transformers' dense one

_HF: dict[str, torch.nn.Module] = {}


def hf_model(path: str) -> torch.nn.Module:
    if path not in _HF:
        _HF[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF[path]


def reference_logprobs(path: str, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the reference logits at each output position: [len(output), vocab]."""
    ids = torch.tensor([prompt + output])
    with torch.inference_mode():
        logits = hf_model(path)(ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(output) - 1], dim=-1)


def run_outputs(engine, prompts, params):
    """Every RequestOutput per request, in order."""
    outs: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert engine.add_request(AddRequest(f"r{i}", p, sp, time.monotonic())) is None
    while engine.has_work():
        for o in engine.step().outputs:
            outs[o.request_id].append(o)
    return [outs[f"r{i}"] for i in range(len(prompts))]


# ---------------------------------------------------------------- worker side (pure tensors)


def test_pending_logprobs_gathers_only_the_asking_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    params = [SamplingParams(), SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    assert PendingLogprobs.capture(logits, [SamplingParams()] * 4) is None  # nobody asked: no work
    pending = PendingLogprobs.capture(logits, params)
    assert pending is not None and pending.rows == [1, 3] and pending.logprobs.shape == (2, 30)
    report = pending.resolve([5, 7, 9, 11])
    assert set(report) == {1, 3}
    ref = torch.log_softmax(logits, dim=-1)
    assert report[1].logprob == pytest.approx(ref[1, 7].item(), abs=1e-6)
    assert report[3].logprob == pytest.approx(ref[3, 11].item(), abs=1e-6)
    top = torch.topk(ref[1], 3)
    assert report[1].top_ids == top.indices.tolist()
    assert report[1].top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
    assert report[3].top_ids == [] and report[3].top_logprobs == []


def test_logprobs_are_raw_before_penalties_and_min_tokens_ban():
    """vLLM's default (raw_logprobs): the report ignores the sampler's edits to the logits."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    p = SamplingParams(temperature=0.0, presence_penalty=2.5, min_tokens=5, stop_token_ids=[2], logprobs=2)
    pending = PendingLogprobs.capture(logits, [p])
    tokens = Sampler(eos_token_ids=[]).sample(logits, [p], [1], [None], None, [([0, 1], 1)])
    assert tokens == [3]  # 1 penalised, 2 banned below min_tokens
    report = pending.resolve(tokens)[0]
    ref = torch.log_softmax(torch.tensor([0.0, 3.0, 2.0, 1.0]), dim=-1)
    assert report.logprob == pytest.approx(ref[3].item(), abs=1e-6)
    assert report.top_ids == [1, 2]


def test_failed_row_has_no_report():
    logits = torch.randn(2, 10)
    pending = PendingLogprobs.capture(logits, [SamplingParams(logprobs=1)] * 2)
    from workers.sampler import SamplingError
    report = pending.resolve([SamplingError("x"), 4])
    assert set(report) == {1}


# ---------------------------------------------------------------- in-process engine vs transformers


@pytest.mark.e2e
def test_engine_logprobs_equal_transformers_log_softmax(tiny_model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]
    n = 10
    params = [greedy(n, ignore_eos=True, logprobs=5),
              greedy(n, ignore_eos=True),  # no logprobs: its outputs carry none
              SamplingParams(max_tokens=n, temperature=0.8, seed=3, ignore_eos=True, logprobs=20,
                             repetition_penalty=1.3)]
    outs = run_outputs(make_engine(tiny_model), prompts, params)
    assert all(not o.logprobs and not o.top_token_ids for o in outs[1])
    for i in (0, 2):
        k = params[i].logprobs
        output = [t for o in outs[i] for t in o.new_token_ids]
        assert len(output) == n
        ref = reference_logprobs(tiny_model.path, prompts[i], output)
        for pos, o in enumerate(outs[i]):
            assert len(o.logprobs) == 1 and len(o.top_token_ids) == k and len(o.top_logprobs) == k
            tok = o.new_token_ids[0]
            assert o.logprobs[0] == pytest.approx(ref[pos, tok].item(), abs=TOL)
            assert o.top_logprobs == sorted(o.top_logprobs, reverse=True)
            want = torch.topk(ref[pos], k)
            assert o.top_logprobs == pytest.approx(want.values.tolist(), abs=TOL)
            # Ids agree except where two reference values are closer than the tolerance.
            for got_id, want_id, v in zip(o.top_token_ids, want.indices.tolist(), want.values.tolist()):
                assert got_id == want_id or abs(ref[pos, got_id].item() - v) < TOL
            if i == 0:  # greedy: the sampled token is the best one
                assert o.top_token_ids[0] == tok
                assert o.logprobs[0] == pytest.approx(o.top_logprobs[0], abs=1e-6)


# ---------------------------------------------------------------- coordinator side (pure)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.path)


def _out(ids, lps=(), top_ids=(), top_lps=()):
    from ascendra.messages import RequestOutput

    return RequestOutput("r", list(ids), logprobs=list(lps), top_token_ids=list(top_ids), top_logprobs=list(top_lps))


def test_token_log_legacy_format_and_offsets():
    from ascendra.token_log import TokenLog

    pieces = {5: b"ab", 6: b"c", 7: b"\xe2\x82", 8: b"zz"}
    log = TokenLog(want_ids=True, num_top=2, chat=False, piece=pieces.__getitem__)
    log.add(_out([5], [-0.5], [5, 6], [-0.5, -1.5]))
    lp, ids = log.take()
    assert ids == [5] and not log.pending
    assert lp == {"tokens": ["ab"], "token_logprobs": [-0.5], "top_logprobs": [{"ab": -0.5, "c": -1.5}],
                  "text_offset": [0]}
    # The sampled token is added to the alternatives when it is not among the best k.
    log.add(_out([7], [-3.0], [5, 6], [-0.1, -0.2]))
    log.add(_out([8], [float("-inf")], [6, 5], [-0.1, -0.2]))
    lp, ids = log.take()
    assert ids == [7, 8] and lp["text_offset"] == [2, 3]  # after "ab", then after "\ufffd"
    assert lp["tokens"] == ["\ufffd", "zz"] and lp["token_logprobs"] == [-3.0, -9999.0]
    assert lp["top_logprobs"][0] == {"ab": -0.1, "c": -0.2, "\ufffd": -3.0}
    full, ids = log.all()
    assert ids == [5, 7, 8] and full["text_offset"] == [0, 2, 3]


def test_token_log_chat_format_and_ids_only():
    from ascendra.token_log import TokenLog

    pieces = {5: b"ab", 6: b"\xe2\x82"}
    log = TokenLog(want_ids=False, num_top=1, chat=True, piece=pieces.__getitem__)
    log.add(_out([6], [-2.0], [5], [-0.1]))
    lp, ids = log.take()
    assert ids is None
    assert lp == {"content": [{"token": "\ufffd", "logprob": -2.0, "bytes": [0xE2, 0x82],
                               "top_logprobs": [{"token": "ab", "logprob": -0.1, "bytes": [97, 98]}]}]}
    as_ids = TokenLog(want_ids=True, num_top=0, chat=False, piece=pieces.__getitem__, tokens_as_ids=True)
    as_ids.add(_out([5], [-0.25]))
    lp, ids = as_ids.take()
    assert lp["tokens"] == ["token_id:5"] and lp["top_logprobs"] == [{"token_id:5": -0.25}] and ids == [5]
    only_ids = TokenLog(want_ids=True, num_top=None, chat=True, piece=pieces.__getitem__)
    only_ids.add(_out([5]))
    only_ids.add(_out([6]))
    assert only_ids.take() == (None, [5, 6]) and only_ids.take() == (None, [])


def test_stop_checker_including_the_stop_string():
    from ascendra.detokenizer import StopChecker

    c = StopChecker(["END", "xy"], include=True)
    assert c.feed("abc E") == ("abc E", False)  # nothing held back: the stop stays in the text anyway
    assert c.feed("N") == ("N", False)
    assert c.feed("D and more") == ("D", True)  # split across three pieces
    c = StopChecker(["END", "cx"], include=True)
    assert c.feed("abcxEND") == ("abcx", True)  # the stop that ends first
    plain = StopChecker(["END"])
    assert plain.feed("abc E") == ("abc ", False) and plain.feed("ND!") == ("", True)


def test_detokenizer_keeps_special_tokens_when_asked(tokenizer):
    from ascendra.detokenizer import DetokenizerFactory

    factory = DetokenizerFactory(tokenizer)
    ids = [6000, 2, 1, 1, 0, 6000] + tokenizer.encode(" héllo 日本", add_special_tokens=False) + [2]
    for skip in (True, False):
        det = factory.new([], skip_special_tokens=skip)
        got = "".join(det.feed([t]) for t in ids) + det.flush()
        assert got == tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in tokenizer.decode(ids, skip_special_tokens=False)
    assert factory.keep_table is not None  # the byte-level fast path serves both
    assert factory.piece(2) == b"<|im_end|>" and factory.piece(6000) == tokenizer.decode([6000]).encode()
    # Without a byte table (SentencePiece vocabularies) the window decoder does the same.
    factory.table = factory._keep_table = None
    for skip in (True, False):
        det = factory.new(ids[:2], skip_special_tokens=skip)
        got = "".join(det.feed([t]) for t in ids) + det.flush()
        assert got == tokenizer.decode(ids, skip_special_tokens=skip)
    assert factory.piece(2) == b"<|im_end|>"


def test_logprobs_validation_names_the_field():
    from ascendra.protocol import APIError, ChatCompletionRequest, CompletionRequest, decode_request, logprobs_of, \
        validate_common

    def value(body: bytes, cls=CompletionRequest):
        req = decode_request(body, cls)
        validate_common(req)
        return logprobs_of(req)

    assert value(b'{"prompt": "x"}') is None
    assert value(b'{"prompt": "x", "logprobs": 0}') == 0
    assert value(b'{"prompt": "x", "logprobs": 20}') == 20
    assert value(b'{"prompt": "x", "logprobs": false}') is None
    chat = b'{"messages": [{"role": "user", "content": "x"}]'
    assert value(chat + b', "logprobs": true}', ChatCompletionRequest) == 0
    assert value(chat + b', "logprobs": true, "top_logprobs": 20}', ChatCompletionRequest) == 20
    assert value(chat + b', "logprobs": false, "top_logprobs": 0}', ChatCompletionRequest) is None
    for body, cls, param in [
        (b'{"prompt": "x", "logprobs": 21}', CompletionRequest, "logprobs"),
        (b'{"prompt": "x", "logprobs": true}', CompletionRequest, "logprobs"),
        (b'{"prompt": "x", "logprobs": 1, "echo": true}', CompletionRequest, "logprobs"),
        (chat + b', "logprobs": 3}', ChatCompletionRequest, "logprobs"),
        (chat + b', "logprobs": true, "top_logprobs": 21}', ChatCompletionRequest, "top_logprobs"),
        (chat + b', "logprobs": true, "top_logprobs": -1}', ChatCompletionRequest, "top_logprobs"),
        (chat + b', "top_logprobs": 2}', ChatCompletionRequest, "top_logprobs"),
        (chat + b', "tools": [{"type": "function", "function": {"name": "f"}}]}', ChatCompletionRequest, "tools"),
        (chat + b', "guided_grammar": "root ::= x"}', ChatCompletionRequest, "guided_grammar"),
    ]:
        with pytest.raises(APIError) as e:
            value(body, cls)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.message)


# ---------------------------------------------------------------- through a real --model tiny server

PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11]
SPECIALS = [6000, 2, 1, 0, 5000]  # with repetition_penalty 0.01 the tiny model repeats these


def fp32() -> tuple[str, ...]:
    """Workers in float32, the reference's dtype (the server's "auto" picks bf16 on a CPU with
    native bf16, whose logprobs differ by ~1e-1)."""
    return ("--dtype", "float32")


@pytest.fixture(scope="module")
def srv():
    from tests.server_harness import ServerProcess

    s = ServerProcess("--model", "tiny", "--max-model-len", "512", *fp32())
    yield s
    s.stop()


def _stream(srv, path: str, body: dict) -> list[dict]:
    from tests.server_harness import sse_events

    status, _, raw = srv.request("POST", path, dict(body, stream=True))
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    return events[:-1]


def _check_against_reference(path, prompt, ids, lps, tops, k):
    """Sampled-token logprobs and the top-k (best first) equal the reference log_softmax."""
    ref = reference_logprobs(path, prompt, ids)
    for pos, (tok, lp, top) in enumerate(zip(ids, lps, tops)):
        assert lp == pytest.approx(ref[pos, tok].item(), abs=TOL)
        want = torch.topk(ref[pos], k).values.tolist()
        assert [v for _, v in top] == pytest.approx(want, abs=TOL)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0][0] == tok  # greedy: the sampled token is the best alternative


@pytest.mark.e2e
def test_completion_logprobs_and_token_ids(srv, tiny_model, tokenizer):
    body = dict(prompt=PROMPT_IDS, max_tokens=8, temperature=0, ignore_eos=True, logprobs=4, return_token_ids=True)
    status, res = srv.post("/v1/completions", body)
    assert status == 200, res
    ch = res["choices"][0]
    ids, lp = ch["token_ids"], ch["logprobs"]
    assert len(ids) == 8 and ch["prompt_token_ids"] == PROMPT_IDS
    assert ch["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    tops = []
    for tok, alts in zip(lp["tokens"], lp["top_logprobs"]):
        assert len(alts) in (4, 5) and tok in alts  # the best 4, and the sampled token
        tops.append(sorted(alts.items(), key=lambda kv: -kv[1])[:4])
    # Compare by id: the legacy format keys alternatives by text, so map the best ones back.
    _check_against_reference(tiny_model.path, PROMPT_IDS, ids, lp["token_logprobs"],
                             [[(ids[i] if t == lp["tokens"][i] else -1, v) for t, v in top]
                              for i, top in enumerate(tops)], 4)
    # Streaming: every chunk carries its tokens' ids and logprobs; together they are the same.
    events = _stream(srv, "/v1/completions", body)
    chunks = [e["choices"][0] for e in events if e["choices"]]
    assert chunks[0]["prompt_token_ids"] == PROMPT_IDS
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c.get("token_ids", [])] == ids
    assert "".join(c["text"] for c in chunks) == ch["text"]
    streamed = [v for c in chunks if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]] == lp["text_offset"]
    for c in chunks:  # a chunk's logprobs cover exactly its own tokens
        assert len(c["logprobs"]["tokens"] if c["logprobs"] else []) == len(c.get("token_ids", []))


@pytest.mark.e2e
def test_chat_logprobs_and_token_ids(srv, tiny_model, tokenizer):
    body = dict(messages=[{"role": "user", "content": "Say something."}], max_tokens=6, temperature=0,
                ignore_eos=True, logprobs=True, top_logprobs=3, return_token_ids=True)
    status, res = srv.post("/v1/chat/completions", body)
    assert status == 200, res
    prompt = res["prompt_token_ids"]
    ch = res["choices"][0]
    ids = ch["token_ids"]
    assert len(ids) == 6 and ch["message"]["content"] == tokenizer.decode(ids, skip_special_tokens=True)
    want_prompt = tokenizer.encode(tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                                                 add_generation_prompt=True), add_special_tokens=False)
    assert prompt == want_prompt  # what the tokenizer gives for the templated text
    content = ch["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in ids]
    # bytes: the token's own bytes, read off its byte-level vocabulary entry.
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    for c, t in zip(content, ids):
        assert bytes(c["bytes"]) == bytes(byte_of[x] for x in tokenizer.convert_ids_to_tokens(t))
        assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["token"] == c["token"]
    assert b"".join(bytes(c["bytes"]) for c in content).decode("utf-8", "replace") == ch["message"]["content"]
    _check_against_reference(tiny_model.path, prompt, ids, [c["logprob"] for c in content],
                             [[(ids[i] if a["token"] == content[i]["token"] else -1, a["logprob"])
                               for a in c["top_logprobs"]] for i, c in enumerate(content)], 3)
    events = _stream(srv, "/v1/chat/completions", body)
    assert events[0]["prompt_token_ids"] == prompt and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("prompt_token_ids" not in e for e in events[1:])
    chunks = [e["choices"][0] for e in events[1:] if e["choices"]]
    assert [t for c in chunks for t in c.get("token_ids", [])] == ids
    streamed = [x for c in chunks if c["logprobs"] for x in c["logprobs"]["content"]]
    assert [x["token"] for x in streamed] == [x["token"] for x in content]
    assert [x["logprob"] for x in streamed] == pytest.approx([x["logprob"] for x in content], abs=1e-5)


@pytest.mark.e2e
def test_logprobs_per_choice_and_as_token_ids(srv):
    body = dict(prompt=PROMPT_IDS, max_tokens=3, temperature=0.9, seed=1, ignore_eos=True, logprobs=0, n=2,
                return_token_ids=True, return_tokens_as_token_ids=True)
    status, res = srv.post("/v1/completions", body)
    assert status == 200, res
    for ch in res["choices"]:
        lp = ch["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in ch["token_ids"]]
        assert [list(d) for d in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]  # k = 0: the sampled one
        assert all(v <= 0 for v in lp["token_logprobs"])


@pytest.mark.e2e
def test_token_ids_without_logprobs(srv, tokenizer):
    prompt = "The quick brown fox"
    body = dict(prompt=prompt, max_tokens=5, temperature=0, ignore_eos=True, return_token_ids=True)
    status, res = srv.post("/v1/completions", body)
    ch = res["choices"][0]
    assert status == 200 and ch["logprobs"] is None
    assert ch["prompt_token_ids"] == tokenizer.encode(prompt)
    assert ch["text"] == tokenizer.decode(ch["token_ids"]) and len(ch["token_ids"]) == 5
    chunks = [e["choices"][0] for e in _stream(srv, "/v1/completions", body) if e["choices"]]
    assert [t for c in chunks for t in c.get("token_ids", [])] == ch["token_ids"]
    # Not asked: no ids anywhere.
    status, res = srv.post("/v1/completions", dict(body, return_token_ids=False))
    assert "token_ids" not in res["choices"][0] and "prompt_token_ids" not in res["choices"][0]


def _text(srv, body, stream: bool) -> tuple[str, str]:
    if not stream:
        status, res = srv.post("/v1/completions", body)
        assert status == 200, res
        return res["choices"][0]["text"], res["choices"][0]["finish_reason"]
    chunks = [e["choices"][0] for e in _stream(srv, "/v1/completions", body) if e["choices"]]
    return "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output(srv, tokenizer, stream):
    base = dict(prompt=PROMPT_IDS, max_tokens=20, temperature=0, ignore_eos=True, return_token_ids=True)
    status, res = srv.post("/v1/completions", base)
    full, ids = res["choices"][0]["text"], res["choices"][0]["token_ids"]
    # A stop string from the middle of the greedy text, split where it may cross tokens.
    stop = full[len(full) // 3: len(full) // 3 + 3]
    at = full.index(stop)
    assert stop and at > 0
    assert _text(srv, dict(base, stop=[stop]), stream) == (full[:at], "stop")
    assert _text(srv, dict(base, stop=[stop], include_stop_str_in_output=True), stream) == \
        (full[:at + len(stop)], "stop")
    # A stop token's text is left out unless asked for (vLLM's rule).
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i] and tokenizer.decode([ids[i]]))
    head = tokenizer.decode(ids[:k])
    assert _text(srv, dict(base, stop_token_ids=[ids[k]]), stream) == (head, "stop")
    assert _text(srv, dict(base, stop_token_ids=[ids[k]], include_stop_str_in_output=True), stream) == \
        (tokenizer.decode(ids[:k + 1]), "stop")


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True])
def test_skip_special_tokens(srv, tokenizer, stream):
    body = dict(prompt=SPECIALS, max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=0.01,
                return_token_ids=True)
    status, res = srv.post("/v1/completions", body)
    ids = res["choices"][0]["token_ids"]
    assert set(ids) & set(tokenizer.all_special_ids), ids  # the test needs special tokens in the output
    kept = tokenizer.decode(ids, skip_special_tokens=False)
    assert kept != tokenizer.decode(ids, skip_special_tokens=True)
    assert _text(srv, body, stream)[0] == tokenizer.decode(ids, skip_special_tokens=True)
    assert _text(srv, dict(body, skip_special_tokens=False), stream)[0] == kept


@pytest.mark.e2e
def test_max_completion_tokens(srv):
    chat = dict(messages=[{"role": "user", "content": "hi"}], temperature=0, ignore_eos=True)
    for extra, want in [(dict(max_completion_tokens=3), 3), (dict(max_completion_tokens=2, max_tokens=5), 2),
                        (dict(max_tokens=4), 4)]:
        status, res = srv.post("/v1/chat/completions", dict(chat, **extra))
        assert status == 200 and res["usage"]["completion_tokens"] == want, (extra, res)
        assert res["choices"][0]["finish_reason"] == "length"
    status, res = srv.post("/v1/chat/completions", dict(chat, max_completion_tokens=0))
    assert status == 400 and res["error"]["param"] == "max_completion_tokens"
    status, res = srv.post("/v1/chat/completions", dict(chat, max_completion_tokens=10_000))
    assert status == 400 and res["error"]["param"] == "max_tokens"  # past the context: the usual message


@pytest.mark.e2e
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", dict(prompt="x", logprobs=21), "logprobs"),
    ("/v1/completions", dict(prompt="x", logprobs=-1), "logprobs"),
    ("/v1/completions", dict(prompt="x", logprobs=True), "logprobs"),
    ("/v1/completions", dict(prompt="x", logprobs=2, echo=True), "logprobs"),
    ("/v1/completions", dict(prompt="x", prompt_logprobs=1), "prompt_logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21),
     "top_logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], logprobs=2), "logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}],
                                  tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], tool_choice="required"), "tool_choice"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}],
                                  response_format={"type": "json_schema", "json_schema": {}}),
     "response_format.json_schema"),
])
def test_out_of_range_fields_get_400_naming_them(srv, path, body, param):
    status, res = srv.post(path, body)
    assert status == 400 and res["error"]["param"] == param, res


@pytest.mark.e2e
def test_bench_client_records_token_ids(srv):
    """bench.compare --check-outputs compares what the client records: ids, now that the server sends them."""
    from bench.client import ClientConfig
    from bench.runner import execute
    from bench.workloads import RequestSpec, prompt_token_ids

    res = execute([RequestSpec(0, 0.0, 12, 6), RequestSpec(1, 0.0, 9, 4)],
                  ClientConfig(base_url=srv.url, record_outputs=True, seed=3), progress=False)
    assert res["server"]["output_token_ids"] is True, res["server"]
    for r, n in zip(res["requests"], (6, 4)):
        assert r["success"] and len(r["output_ids"]) == n
        prompt = prompt_token_ids(3, r["index"], r["prompt_len"])
        status, direct = srv.post("/v1/completions", dict(prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True,
                                                          return_token_ids=True))
        assert r["output_ids"] == direct["choices"][0]["token_ids"]


@pytest.mark.e2e
def test_logprobs_survive_escalation(tiny_model):
    """The request's logprobs setting moves with it: tokens made on the HP instance carry them too."""
    from tests.server_harness import ServerProcess, parse_metrics

    s = ServerProcess("--model", "tiny", "--num-instances", "2", "--policy", "ascendra",
                      "--force-escalation-after", "2", "--chunk-size", "32", "--num-blocks", "256", *fp32())
    try:
        body = dict(prompt=PROMPT_IDS * 6, max_tokens=8, temperature=0, ignore_eos=True, logprobs=2,
                    return_token_ids=True)
        status, res = s.post("/v1/completions", body)
        assert status == 200, res
        ch = res["choices"][0]
        ids, lps = ch["token_ids"], ch["logprobs"]["token_logprobs"]
        assert len(ids) == len(lps) == 8
        ref = reference_logprobs(tiny_model.path, PROMPT_IDS * 6, ids)
        assert lps == pytest.approx([ref[i, t].item() for i, t in enumerate(ids)], abs=TOL)
        chunks = [e["choices"][0] for e in _stream(s, "/v1/completions", body) if e["choices"]]
        assert [t for c in chunks for t in c.get("token_ids", [])] == ids
        assert [v for c in chunks if c["logprobs"] for v in c["logprobs"]["token_logprobs"]] == \
            pytest.approx(lps, abs=1e-5)
        m = parse_metrics(s.metrics())
        assert sum(v for k, v in m.items() if k.startswith("ascendra:escalations_total")) >= 2
    finally:
        s.stop()


@pytest.mark.e2e
def test_chat_stream_role_delta_comes_with_the_first_token(srv):
    """The assistant-role delta is not sent at admission but in the same write as the first
    token, so a client timing the first chunk with choices measures the real TTFT."""
    import http.client
    import json
    from urllib.parse import urlsplit

    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = dict(messages=[{"role": "user", "content": "Say something."}], max_tokens=4, temperature=0,
                ignore_eos=True, stream=True)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(1 << 16)  # one HTTP chunk: what the server wrote first
    resp.read()
    conn.close()
    events = [json.loads(line[6:]) for line in first.decode().split("\n") if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len(events) >= 2 and events[1]["choices"][0]["delta"].get("content") is not None
