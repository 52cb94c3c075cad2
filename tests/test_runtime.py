"""The runtime's greedy output equals transformers' own greedy generation, token for token."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ascendra.messages import AddRequest, SamplingParams
from tests.runtime_utils import greedy, make_engine, run_all

# Runs the real model through the engine (seconds per test on CPU).
pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "Hello! " * 40,  # longer than one 64-token chunk
    "What is the meaning of life? " * 12,
    "a",
    "The quick brown fox jumps over the lazy dog. " * 9,
    "Translate to French: good morning",
]


def hf_greedy(model_path: str, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:  # one at a time: no padding in the reference
            x = torch.tensor([ids])
            y = hf.generate(x, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                            pad_token_id=hf.config.eos_token_id)
            out.append(y[0, len(ids):].tolist())
    return out


def _prompt_ids(path):
    tok = AutoTokenizer.from_pretrained(path)
    return [tok(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("policy", ["sarathi", "vllm", "lp", "hp"])
def test_tiny_greedy_matches_transformers(tiny_model, policy):
    ids = _prompt_ids(tiny_model.path)
    engine = make_engine(tiny_model, policy=policy, chunk_size=64, scatter_seed=3)
    ours, reasons = run_all(engine, ids, greedy(24, ignore_eos=True))
    assert reasons == ["length"] * len(ids)
    assert ours == hf_greedy(tiny_model.path, ids, 24)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_tiny_blocks_are_scattered(tiny_model):
    """The scatter option really gives requests non-contiguous, out-of-order blocks."""
    engine = make_engine(tiny_model, scatter_seed=3)
    engine.add_request(AddRequest("x", list(range(100, 180)), greedy(4), 0.0))
    engine.step()
    table = engine.requests["x"].block_table
    assert table != sorted(table) or any(b - a != 1 for a, b in zip(table, table[1:]))
    engine.abort("x")
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_smollm2_greedy_matches_transformers(smollm2_model):
    ids = _prompt_ids(smollm2_model.path)
    engine = make_engine(smollm2_model, chunk_size=64, scatter_seed=5)
    ours, _ = run_all(engine, ids, greedy(8, ignore_eos=True))
    assert ours == hf_greedy(smollm2_model.path, ids, 8)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_preemption_by_recompute_keeps_greedy_output(tiny_model):
    """A pool too small for every request at once forces preemptions; outputs do not change."""
    ids = _prompt_ids(tiny_model.path)[:6]
    roomy = make_engine(tiny_model, num_blocks=256)
    expected, _ = run_all(roomy, ids, greedy(40, ignore_eos=True))
    tight = make_engine(tiny_model, num_blocks=14, chunk_size=64)
    got, reasons = run_all(tight, ids, greedy(40, ignore_eos=True))
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert reasons == ["length"] * len(ids)
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_too_long_and_never_fits_fail_alone(tiny_model):
    engine = make_engine(tiny_model, num_blocks=8, max_model_len=256)
    ok = [5, 6, 7, 8]
    too_long = list(range(10, 10 + 300))  # over max_model_len
    never_fits = list(range(10, 10 + 100))  # fits the model, not 8 blocks of 16 with 64 outputs
    params = [greedy(4), greedy(4), greedy(64), greedy(4)]
    out, reasons = run_all(engine, [ok, too_long, never_fits, ok], params)
    assert reasons[1] == "error" and reasons[2] == "error"
    assert len(out[0]) == 4 and len(out[3]) == 4
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_rejection_reasons_are_clear(tiny_model):
    engine = make_engine(tiny_model, num_blocks=8, max_model_len=256)
    err = engine.add_request(AddRequest("a", list(range(300)), greedy(4), 0.0))
    assert "limit is 256" in err.error
    err = engine.add_request(AddRequest("b", list(range(100)), greedy(64), 0.0))
    assert "KV blocks" in err.error
    err = engine.add_request(AddRequest("c", [10**9], greedy(4), 0.0))
    assert "vocabulary" in err.error


def test_stop_conditions(tiny_model):
    engine = make_engine(tiny_model)
    prompt = [[1, 2, 3, 4]]
    free_run, _ = run_all(engine, prompt, greedy(12, ignore_eos=True))
    stop_at = free_run[0][5]
    first = free_run[0].index(stop_at)
    out, reasons = run_all(engine, prompt, greedy(12, ignore_eos=True, stop_token_ids=[stop_at]))
    assert out[0] == free_run[0][: first + 1] and reasons == ["stop"]
    # min_tokens keeps the stop token from being chosen until enough tokens exist.
    out, reasons = run_all(engine, prompt, greedy(12, ignore_eos=True, stop_token_ids=[stop_at], min_tokens=first + 2))
    assert len(out[0]) >= first + 2 and stop_at not in out[0][: first + 1]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible(tiny_model):
    engine = make_engine(tiny_model)
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a, _ = run_all(engine, [[1, 2, 3]] * 3, sp)
    b, _ = run_all(engine, [[1, 2, 3]], sp)
    assert a[0] == a[1] == a[2] == b[0]
    c, _ = run_all(engine, [[1, 2, 3]], SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True))
    assert c[0] != a[0]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_top_k_one_is_greedy(tiny_model):
    engine = make_engine(tiny_model)
    g, _ = run_all(engine, [[7, 8, 9]], greedy(10, ignore_eos=True))
    k1, _ = run_all(engine, [[7, 8, 9]], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True))
    assert g == k1
