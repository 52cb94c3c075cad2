"""The throughput bound (ascendra.sim.bound) and per-request objectives in simulated runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ascendra.perf_model import PerfModel
from ascendra.sim.bound import throughput_bound
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


def test_simulated_requests_are_scored_against_their_own_objectives():
    setup = small_setup(num_requests=60)
    specs = [replace(s, ttft_slo_s=1e-6 if s.index % 2 else 100.0, tbt_slo_s=100.0) for s in setup.requests(2.0)]
    _, res = run(setup, "sarathi", 2.0, specs=specs)
    results = to_request_results(res)
    assert [r.ttft_slo_s for r in results] == [s.ttft_slo_s for s in sorted(specs, key=lambda s: s.index)]
    # The impossible class misses, the relaxed one meets: half, whatever the run's defaults say.
    assert metrics.attainment(results, setup.sim.ttft_slo, setup.sim.tbt_slo) == pytest.approx(0.5)
