"""Workload generation (bench/workloads.py): traces, arrivals, lengths, prompts."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench import workloads as wl
from bench.client import default_trace_path

TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:48.0000000,879,55
2023-11-16 18:15:51.3910170,91,16
"""


def test_parse_azure_trace_sorts_and_offsets():
    rows = wl.parse_trace(TRACE.splitlines())
    assert [r.prompt_len for r in rows] == [374, 879, 396, 91]
    assert rows[0].offset_s == 0.0
    assert rows[1].offset_s == pytest.approx(48.0 - 46.68059)
    assert rows[3].offset_s == pytest.approx(51.391017 - 46.68059)


def test_parse_trace_numeric_timestamps_and_bad_header():
    rows = wl.parse_trace(["TIMESTAMP,ContextTokens,GeneratedTokens", "10.5,5,6", "12,7,8"])
    assert [r.offset_s for r in rows] == [0.0, 1.5]
    with pytest.raises(ValueError):
        wl.parse_trace(["a,b,c", "1,2,3"])


def test_shared_trace_loads_when_present():
    path = default_trace_path()
    if path is None:
        pytest.skip("../shared/traces/azure_llm_2023_conv.csv not present")
    rows = wl.load_trace(path)
    assert len(rows) == 19366
    assert 50 * 60 < rows[-1].offset_s < 62 * 60
    assert statistics.median(r.prompt_len for r in rows) == pytest.approx(1020, rel=0.05)


def test_rescale_keeps_relative_timing():
    offs = [0.0, 0.5, 0.6, 3.0, 3.1, 10.0]
    out = wl.rescale_times(offs, rate=2.0)
    assert wl.trace_rate(out) == pytest.approx(2.0)
    factor = out[-1] / offs[-1]
    assert out == pytest.approx([t * factor for t in offs])
    # Offsets need not start at zero.
    shifted = wl.rescale_times([t + 7 for t in offs], rate=2.0)
    assert shifted == pytest.approx(out)
    assert wl.rescale_times(offs, math.inf) == [0.0] * len(offs)


def test_trace_workload_own_timing_and_resampled():
    rows = wl.parse_trace(TRACE.splitlines())
    own = wl.build_workload(wl.WorkloadConfig(dataset="trace"), rows)
    assert [s.arrival_s for s in own] == pytest.approx([r.offset_s for r in rows])
    assert [(s.prompt_len, s.output_len) for s in own] == [(r.prompt_len, r.output_len) for r in rows]
    fast = wl.build_workload(wl.WorkloadConfig(dataset="trace", rate=30.0), rows)
    ratios = [f.arrival_s / o.arrival_s for f, o in zip(fast[1:], own[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    assert wl.trace_rate([s.arrival_s for s in fast]) == pytest.approx(30.0)
    # A window: first rows only, duration cuts by send time.
    first2 = wl.build_workload(wl.WorkloadConfig(dataset="trace", num_requests=2), rows)
    assert len(first2) == 2
    dur = wl.build_workload(wl.WorkloadConfig(dataset="trace", duration_s=2.0), rows)
    assert len(dur) == 2
    start = wl.build_workload(wl.WorkloadConfig(dataset="trace", trace_start=1, num_requests=2), rows)
    assert start[0].arrival_s == 0.0 and start[0].prompt_len == 879


def test_trace_lengths_with_poisson_arrivals():
    rows = wl.parse_trace(TRACE.splitlines())
    specs = wl.build_workload(wl.WorkloadConfig(dataset="trace", arrivals="poisson", rate=5.0), rows)
    assert [s.prompt_len for s in specs] == [374, 879, 396, 91]


def test_poisson_and_gamma_rates():
    n, rate = 20000, 4.0
    for burst in (1.0, 0.25, 4.0):
        t = wl.arrival_times(n, rate, burst, random.Random(1))
        assert t[0] == 0.0
        assert (n - 1) / t[-1] == pytest.approx(rate, rel=0.05)
        gaps = [b - a for a, b in zip(t, t[1:])]
        cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
        assert cv2 == pytest.approx(1 / burst, rel=0.15)  # gamma: CV^2 = 1/shape
    with pytest.raises(ValueError):
        wl.unit_gaps(3, 0.0, random.Random(0))


def test_synthetic_workloads_are_seeded_and_rate_scaled():
    cfg = wl.WorkloadConfig(dataset="uniform", num_requests=50, rate=2.0, prompt_len=100, output_len=20, seed=3)
    a, b = wl.build_workload(cfg), wl.build_workload(cfg)
    assert a == b
    assert all(50 <= s.prompt_len <= 150 and 10 <= s.output_len <= 30 for s in a)
    # Same seed at another rate: same lengths, times scaled by the rate ratio.
    c = wl.build_workload(wl.WorkloadConfig(**{**cfg.__dict__, "rate": 4.0}))
    assert [(s.prompt_len, s.output_len) for s in c] == [(s.prompt_len, s.output_len) for s in a]
    assert [s.arrival_s * 2 for s in c] == pytest.approx([s.arrival_s for s in a])
    d = wl.build_workload(wl.WorkloadConfig(**{**cfg.__dict__, "seed": 4}))
    assert d != a


def test_duration_limits_synthetic_workload():
    specs = wl.build_workload(wl.WorkloadConfig(dataset="fixed", rate=10.0, duration_s=5.0))
    assert all(s.arrival_s < 5.0 for s in specs)
    assert 25 < len(specs) < 80
    with pytest.raises(ValueError):
        wl.build_workload(wl.WorkloadConfig(dataset="fixed"))  # no rate


def test_sharegpt_like_lengths():
    pairs = wl.sharegpt_lengths(5000, random.Random(0))
    assert all(p + o < 2048 and p >= 1 and o >= 1 for p, o in pairs)
    assert statistics.fmean(p for p, _ in pairs) == pytest.approx(wl.SHAREGPT_PROMPT_MEAN, rel=0.15)
    assert statistics.fmean(o for _, o in pairs) == pytest.approx(wl.SHAREGPT_OUTPUT_MEAN, rel=0.15)


def test_length_scaling_and_clipping():
    pairs = [(1000, 200), (10, 1), (3000, 600)]
    assert wl.scale_lengths(pairs, 0.1, 0.5) == [(100, 100), (1, 1), (300, 300)]
    assert wl.scale_lengths(pairs, max_prompt_len=512, max_output_len=64) == [(512, 64), (10, 1), (512, 64)]
    specs = wl.build_workload(wl.WorkloadConfig(dataset="fixed", rate=1.0, num_requests=3, prompt_len=400,
                                                output_len=40, prompt_scale=0.25, max_output_len=16))
    assert {(s.prompt_len, s.output_len) for s in specs} == {(100, 16)}


def test_prompts_exact_and_deterministic():
    ids = wl.prompt_token_ids(7, 3, 123)
    assert len(ids) == 123 and ids == wl.prompt_token_ids(7, 3, 123)
    assert ids != wl.prompt_token_ids(7, 4, 123)
    lo, hi = wl.PROMPT_ID_RANGE
    assert all(lo <= i < hi for i in ids)
    text = wl.prompt_text(7, 3, 50)
    assert len(text.split()) == 50 and text == wl.prompt_text(7, 3, 50)


def test_longbench_like_lengths_fill_the_window_and_stay_inside_it():
    pairs = wl.longbench_lengths(2000, random.Random(0), max_model_len=8192)
    assert all(p + o <= 8192 and p >= 1 and 1 <= o <= wl.LONGBENCH_SUMMARY_MAX for p, o in pairs)
    prompts = [p for p, _ in pairs]
    # ~8,700-token mean before truncation: most prompts are thousands of tokens, many at the cap.
    assert 5000 <= statistics.mean(prompts) <= 8192
    assert sum(p + o == 8192 for p, o in pairs) >= 0.2 * len(pairs)
    assert statistics.median(o for _, o in pairs) <= 128  # mostly short answers


def test_code_like_lengths_long_prompts_short_outputs():
    pairs = wl.code_lengths(4000, random.Random(0))
    assert 1200 <= statistics.median(p for p, _ in pairs) <= 1800
    assert 9 <= statistics.median(o for _, o in pairs) <= 17
    assert all(p + o <= wl.DEFAULT_MAX_MODEL_LEN for p, o in pairs)


@pytest.mark.parametrize("dataset", ["longbench", "code"])
def test_new_datasets_through_build_workload_are_seeded(dataset):
    cfg = wl.WorkloadConfig(dataset=dataset, num_requests=50, rate=2.0, seed=3, max_model_len=4096)
    a, b = wl.build_workload(cfg), wl.build_workload(cfg)
    assert a == b and len(a) == 50 and all(s.prompt_len + s.output_len <= 4096 for s in a)


def test_slo_classes_per_request_with_their_shares_and_lengths_unchanged():
    base = wl.WorkloadConfig(dataset="sharegpt", num_requests=2000, rate=10.0, seed=1)
    mixed = wl.WorkloadConfig(dataset="sharegpt", num_requests=2000, rate=10.0, seed=1,
                              slo_classes=((0.3, 0.25, 0.1), (0.7, 5.0, 0.25)))
    plain, classed = wl.build_workload(base), wl.build_workload(mixed)
    assert [(s.arrival_s, s.prompt_len, s.output_len) for s in plain] == \
        [(s.arrival_s, s.prompt_len, s.output_len) for s in classed]
    assert all(s.ttft_slo_s is None for s in plain)
    tight = sum(s.ttft_slo_s == 0.25 and s.tbt_slo_s == 0.1 for s in classed)
    assert sum(s.ttft_slo_s == 5.0 and s.tbt_slo_s == 0.25 for s in classed) == len(classed) - tight
    assert 0.25 <= tight / len(classed) <= 0.35
    with pytest.raises(ValueError):
        wl.assign_slo_classes(plain, ((0.5, 1.0, 0.1),), 0)


def test_burstiness_for_cv_gives_that_cv():
    gaps = wl.unit_gaps(40000, wl.burstiness_for_cv(3.0), random.Random(0))
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert 2.6 <= cv <= 3.4
    assert wl.burstiness_for_cv(1.0) == 1.0
