"""Pure metric math of bench/metrics.py and bench/promtext.py."""

from __future__ import annotations

import math

import pytest

from bench import metrics, promtext
from bench.metrics import Capacity, RequestResult


def done(index: int, send: float, times: list[float], n_out: int | None = None) -> RequestResult:
    n = len(times) if n_out is None else n_out
    return RequestResult(index=index, prompt_len=10, output_len=n, scheduled_s=send, send_s=send,
                         success=True, token_times_s=times, chunk_tokens=[1] * len(times),
                         end_s=times[-1], n_out=n)


def failed(index: int, reason: str = "http 500: boom") -> RequestResult:
    return RequestResult(index=index, prompt_len=10, output_len=5, scheduled_s=0.0, send_s=0.0,
                         error=reason, end_s=0.1)


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert metrics.percentile(xs, 50) == 3.0
    assert metrics.percentile(xs, 0) == 1.0
    assert metrics.percentile(xs, 100) == 5.0
    assert metrics.percentile(xs, 25) == 2.0
    assert metrics.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert metrics.percentile([], 50) is None
    assert metrics.percentile([7.0], 99) == 7.0


def test_ttft_gaps_mean_tbt():
    r = done(0, 1.0, [1.5, 1.6, 1.8, 2.1])
    assert metrics.ttft(r) == pytest.approx(0.5)
    assert metrics.gaps(r) == pytest.approx([0.1, 0.2, 0.3])
    assert metrics.mean_tbt(r) == pytest.approx(0.6 / 3)
    assert metrics.e2e(r) == pytest.approx(1.1)
    # Usage may report more tokens than chunks (several tokens in one chunk).
    r2 = done(1, 0.0, [0.5, 1.5], n_out=5)
    assert metrics.mean_tbt(r2) == pytest.approx(1.0 / 4)
    # One output token: no gap, TBT is vacuously met.
    r3 = done(2, 0.0, [0.2])
    assert metrics.mean_tbt(r3) is None
    assert metrics.meets_slo(r3, ttft_slo=0.3, tbt_slo=0.01)


def test_attainment_counts_failures_in_denominator():
    ok = done(0, 0.0, [0.1, 0.2, 0.3])  # TTFT 0.1, TBT 0.1
    slow_first = done(1, 0.0, [0.9, 1.0])  # TTFT 0.9
    slow_tbt = done(2, 0.0, [0.1, 0.5, 0.9])  # TBT 0.4
    rs = [ok, slow_first, slow_tbt, failed(3)]
    assert metrics.attainment(rs, 0.5, 0.2) == pytest.approx(1 / 4)
    assert metrics.attainment([], 0.5, 0.2) == 0.0


def test_p99_variant_is_stricter_with_one_long_gap():
    # Mean gap small, one large stall.
    times = [0.1 + 0.01 * i for i in range(50)] + [2.0]
    r = done(0, 0.0, times)
    assert metrics.meets_slo(r, 1.0, 0.1, "mean")
    assert not metrics.meets_slo(r, 1.0, 0.1, "p99")


def test_summarize_headline_keys_and_values():
    rs = [done(0, 0.0, [0.1, 0.2, 0.3]), done(1, 1.0, [1.2, 1.3, 1.4]), failed(2, "timeout: x")]
    s = metrics.summarize(rs, duration_s=2.0, ttft_slo=0.5, tbt_slo=0.2)
    for k in ("completed", "failed", "attainment", "goodput_rps", "output_tok_s", "ttft_p50_s",
              "ttft_p99_s", "tbt_mean_p50_s", "tbt_mean_p99_s"):
        assert k in s
    assert s["completed"] == 2 and s["failed"] == 1 and s["num_requests"] == 3
    assert s["attainment"] == pytest.approx(2 / 3)
    assert s["goodput_rps"] == pytest.approx(1.0)
    assert s["output_tok_s"] == pytest.approx(6 / 2.0)
    assert s["ttft_p50_s"] == pytest.approx(0.15)
    assert s["failure_reasons"] == {"timeout": 1}


def test_summarize_empty_run_has_no_nan():
    s = metrics.summarize([failed(0)], duration_s=0.0, ttft_slo=1, tbt_slo=1)
    assert s["goodput_rps"] is None and s["attainment"] == 0.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in s.values())


def test_capacity_interpolates_first_crossing():
    c = metrics.capacity([(1, 1.0), (2, 0.95), (3, 0.85), (4, 0.2)])
    assert c.bound == "interpolated"
    assert c.value == pytest.approx(2.5)
    # Unsorted input, exact threshold counts as meeting.
    c = metrics.capacity([(4, 0.5), (2, 0.9)])
    assert c.value == pytest.approx(2.0)


def test_capacity_bounds():
    assert metrics.capacity([(1, 1.0), (2, 0.99)]) == Capacity(2, "lower_bound")
    assert metrics.capacity([(1, 0.5), (2, 0.1)]) == Capacity(1, "upper_bound")
    assert metrics.capacity([]) == Capacity(None, "none")
    assert Capacity(2.0, "lower_bound").label() == ">= 2"


def test_prometheus_text_parse_sums_labels_and_skips_buckets():
    text = """# HELP ascendra:generation_tokens_total Generated tokens.
# TYPE ascendra:generation_tokens_total counter
ascendra:generation_tokens_total 42
ascendra:time_to_first_token_seconds_bucket{le="0.1"} 3
ascendra:time_to_first_token_seconds_sum 1.5
ascendra:time_to_first_token_seconds_count 4
ascendra:num_requests_running{instance="0"} 2
ascendra:num_requests_running{instance="1"} 1
"""
    m = promtext.parse(text)
    assert m["ascendra:generation_tokens_total"] == 42
    assert m["ascendra:time_to_first_token_seconds_count"] == 4
    assert m["ascendra:num_requests_running"] == 3
    assert not any(k.endswith("_bucket") for k in m)
    assert promtext.delta({"a": 1.0}, {"a": 3.0, "b": 1.0}) == {"a": 2.0, "b": 1.0}


def test_attainment_counts_each_request_against_its_own_objectives():
    # Same timings (TTFT 0.5 s, mean TBT 0.1 s): met under a relaxed class, missed under a tight one.
    relaxed = done(0, send=0.0, times=[0.5, 0.6, 0.7])
    tight = done(1, send=0.0, times=[0.5, 0.6, 0.7])
    relaxed.ttft_slo_s, relaxed.tbt_slo_s = 5.0, 0.25
    tight.ttft_slo_s, tight.tbt_slo_s = 0.25, 0.1
    plain = done(2, send=0.0, times=[0.5, 0.6, 0.7])  # the run's objectives below
    assert [metrics.meets_slo(r, 1.0, 0.15) for r in (relaxed, tight, plain)] == [True, False, True]
    assert metrics.attainment([relaxed, tight, plain], 1.0, 0.15) == pytest.approx(2 / 3)
    # Per class: the run's objectives form a class of their own; TTFT met alone is counted apart.
    close = done(3, send=0.0, times=[0.2, 0.5, 0.8])  # TTFT 0.2 s inside 0.25, TBT 0.3 s over 0.1
    close.ttft_slo_s, close.tbt_slo_s = 0.25, 0.1
    by = metrics.attainment_by_class([relaxed, tight, plain, close, failed(4)], 1.0, 0.15)
    assert by == {"0.25/0.1": {"requests": 2, "attainment": 0.0, "ttft_met": 0.5},
                  "1/0.15": {"requests": 2, "attainment": 0.5, "ttft_met": 0.5},
                  "5/0.25": {"requests": 1, "attainment": 1.0, "ttft_met": 1.0}}
    assert metrics.attainment_by_class([plain, failed(4)], 1.0, 0.15) == {}  # one class: nothing to split
