"""The throughput bound (ascendra.sim.bound) and per-request objectives in simulated runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ascendra.perf_model import PerfModel
from ascendra.sim.bound import _PRICE_TOKENS, disaggregated_bound, throughput_bound, work_bound
from ascendra.sim.sweep import to_request_results
from bench import metrics
from bench.workloads import RequestSpec
from tests.test_sim import run, small_setup


def test_bound_by_hand():
    # Linear steps: 10 ms + 1 ms a prefill token + 0.5 ms a decode. Prompts 100, outputs 10: B decodes
    # a step come with 10 x B prefill tokens, so a step takes 0.01 + 0.0105 B. Under a 0.05 s TBT, B = 3
    # (0.0415 s): 3 / (10 x 0.0415) = 7.23 req/s an instance, x2 instances.
    cost = PerfModel.from_list([0.01, 0.001, 0.0, 0.0005, 0.0])
    reqs = [RequestSpec(i, 0.0, 100, 10) for i in range(4)]
    b = throughput_bound(cost, reqs, 0.05, 8, 2)
    assert b.binding == "tbt" and b.decodes == 3 and b.rate == pytest.approx(2 * 3 / (10 * 0.0415))
    few_seats = throughput_bound(cost, reqs, 0.05, 2, 2)  # two seats: B = 2, 0.031 s steps
    assert few_seats.binding == "seats" and few_seats.rate == pytest.approx(2 * 2 / (10 * 0.031))
    # A tighter per-request TBT caps the step lower and lowers the bound.
    tight = [replace(r, tbt_slo_s=0.03) for r in reqs]
    assert throughput_bound(cost, tight, 0.05, 8, 2).rate < b.rate


def test_work_bound_by_hand():
    # Linear steps: 10 ms a step, 1 ms a prefill token, 1 us an attention pair, 0.5 ms a decode, 10 us a
    # context token a decode reads. The cheapest steps are the largest: a token costs 1 ms (a decode
    # 0.5 ms) plus the constant spread over the largest step tried. A request of 100 prompt and 10 output
    # tokens: 100 prompt tokens, 9 decodes, 100 x 101 / 2 pairs, 9 decodes reading 101..109 tokens.
    cost = PerfModel.from_list([0.01, 0.001, 1e-6, 0.0005, 1e-5])
    reqs = [RequestSpec(i, 0.0, 100, 10) for i in range(4)]
    spread = 0.01 / max(_PRICE_TOKENS)
    work = (0.001 + spread) * 100 + (0.0005 + spread) * 9 + 1e-6 * 5050 + 1e-5 * (9 * 100 + 45)
    assert work_bound(cost, reqs, 2) == pytest.approx(2 / work)
    # It prices the same work as the identical-step bound with nothing fixed per step, so it lies
    # above it, with or without a TBT objective; and it does not move with the objective.
    assert work_bound(cost, reqs, 2) > throughput_bound(cost, reqs, None, 128, 2).rate
    assert work_bound(cost, [replace(r, tbt_slo_s=0.001) for r in reqs], 2) == work_bound(cost, reqs, 2)


def test_disaggregated_bound_by_hand():
    # Linear steps as above without attention. A whole 100-token prompt takes 0.01 + 0.1 s: 9.09 requests a
    # second an instance. A decode step of B decodes takes 0.01 + 0.0005 B; 8 seats: 0.014 s for 8 of the 10
    # tokens after the first, 57.1 requests a second. With 2 instances one prefills and one decodes: the
    # prefill instance binds, under the colocated bound's 15.2 (4 decodes and 36 prefill tokens a 48 ms
    # step, on both instances).
    cost = PerfModel.from_list([0.01, 0.001, 0.0, 0.0005, 0.0])
    reqs = [RequestSpec(i, 0.0, 100, 11) for i in range(4)]
    b = disaggregated_bound(cost, reqs, 0.05, 8, 2)
    assert b.binding == "1 prefill, prefill" and b.rate == pytest.approx(1 / 0.11)
    assert b.decodes == 8 and b.step_s == pytest.approx(0.014)
    assert b.rate < throughput_bound(cost, reqs, 0.05, 8, 2).rate
    # Three instances: two prefill (18.2 req/s), one decodes (57.1): still the prefill side.
    assert disaggregated_bound(cost, reqs, 0.05, 8, 3).binding == "2 prefill, prefill"
    assert disaggregated_bound(cost, reqs, 0.05, 8, 1) is None  # nothing to split


def test_simulated_requests_are_scored_against_their_own_objectives():
    setup = small_setup(num_requests=60)
    specs = [replace(s, ttft_slo_s=1e-6 if s.index % 2 else 100.0, tbt_slo_s=100.0) for s in setup.requests(2.0)]
    _, res = run(setup, "sarathi", 2.0, specs=specs)
    results = to_request_results(res)
    assert [r.ttft_slo_s for r in results] == [s.ttft_slo_s for s in sorted(specs, key=lambda s: s.index)]
    # The impossible class misses, the relaxed one meets: half, whatever the run's defaults say.
    assert metrics.attainment(results, setup.sim.ttft_slo, setup.sim.tbt_slo) == pytest.approx(0.5)
