"""Presence, frequency and repetition penalties as vLLM defines them, checked against references:
transformers' own repetition penalty, and the OpenAI definition of presence/frequency penalties
applied inside transformers' generate loop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from ascendra.messages import SamplingParams
from tests.runtime_utils import greedy, make_engine, run_all
from workers.sampler import Sampler, apply_penalties


class OpenAIPenalties(LogitsProcessor):
    """logit[t] -= frequency * count(t in output) + presence * [t in output]: the reference."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = input_ids[0, self.prompt_len:]
        counts = torch.bincount(out, minlength=scores.shape[1]).to(scores.dtype)[: scores.shape[1]]
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_repetition_penalty_equals_transformers_processor():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    hist = [([1, 2, 3, 2, 40], 3), ([5, 6], 2), ([7, 7, 8, 9], 1)]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(), SamplingParams(repetition_penalty=0.5)]
    got = logits.clone()
    apply_penalties(got, params, hist)
    for i, (ids, _) in enumerate(hist):
        pen = params[i].repetition_penalty
        ref = RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([ids]), logits[i:i + 1].clone()) if pen != 1 \
            else logits[i:i + 1]
        torch.testing.assert_close(got[i:i + 1], ref)
    assert not torch.equal(got[0], logits[0]) and torch.equal(got[1], logits[1])


def test_presence_and_frequency_count_only_output_tokens():
    logits = torch.zeros(1, 10)
    # prompt [4, 4], output [4, 5, 5, 5]
    apply_penalties(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [([4, 4, 4, 5, 5, 5], 2)])
    expect = torch.zeros(1, 10)
    expect[0, 4] = -(0.5 + 0.25 * 1)
    expect[0, 5] = -(0.5 + 0.25 * 3)
    torch.testing.assert_close(logits, expect)
    # A negative penalty encourages repetition.
    logits = torch.zeros(1, 10)
    apply_penalties(logits, [SamplingParams(presence_penalty=-1.0)], [([1, 2], 1)])
    assert logits[0, 2] == 1.0 and logits[0, 1] == 0.0


def test_greedy_argmax_sees_the_penalised_logits():
    s = Sampler(eos_token_ids=[])
    logits = torch.tensor([[0.0, 3.0, 2.0]])
    p = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert s.sample(logits.clone(), [p], [1], [None], None, [([0, 1], 1)]) == [2]
    assert s.sample(logits.clone(), [SamplingParams(temperature=0.0)], [1], [None], None, [([0, 1], 1)]) == [1]


def _hf_generate(path: str, ids: list[int], n: int, processors: list) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        y = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=hf.config.eos_token_id, logits_processor=LogitsProcessorList(processors))
    return y[0, len(ids):].tolist()


@pytest.mark.e2e
def test_engine_penalties_match_transformers_generate(tiny_model):
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25]]
    n = 12
    # The random-weight model rarely repeats a token on its own, so the penalties here pull
    # towards repeats (below 1 / negative): that makes them change the greedy choice.
    params = [greedy(n, ignore_eos=True, repetition_penalty=0.2),
              greedy(n, ignore_eos=True),
              greedy(n, ignore_eos=True, presence_penalty=-2.0, frequency_penalty=0.5)]
    got, _ = run_all(make_engine(tiny_model), prompts, params)
    refs = [
        _hf_generate(tiny_model.path, prompts[0], n, [RepetitionPenaltyLogitsProcessor(0.2)]),
        _hf_generate(tiny_model.path, prompts[1], n, []),
        _hf_generate(tiny_model.path, prompts[2], n, [OpenAIPenalties(len(prompts[2]), -2.0, 0.5)]),
    ]
    assert got == refs
    plain, _ = run_all(make_engine(tiny_model), [prompts[0], prompts[2]], greedy(n, ignore_eos=True))
    assert plain[0] != got[0] and plain[1] != got[2]  # the penalties changed the choices
