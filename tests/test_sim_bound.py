"""The throughput bound (ascendra.sim.bound) and per-request objectives in simulated runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ascendra.sim.bound import throughput_bound
from ascendra.sim.sweep import to_request_results
from bench import metrics
from bench.workloads import RequestSpec
from tests.test_sim import run, small_setup


def test_bound_by_hand():
    # W = 0.001 * 100 + 0.0005 * 10 = 0.105 s a request. TBT floor: (1 - 0.01 / 0.05) / 0.105 = 7.62
    # req/s an instance; seats: 1 / (0.105 + 0.01 * 10 / 8) = 8.51. The TBT floor binds: x2 instances.
    reqs = [RequestSpec(i, 0.0, 100, 10) for i in range(4)]
    b = throughput_bound([0.01, 0.001, 0.0, 0.0005, 0.0], reqs, 0.05, 8, 2)
    assert b.binding == "tbt" and b.rate == pytest.approx(2 * 0.8 / 0.105)
    few_seats = throughput_bound([0.01, 0.001, 0.0, 0.0005, 0.0], reqs, 0.05, 1, 2)
    assert few_seats.binding == "seats" and few_seats.rate == pytest.approx(2 / (0.105 + 0.1))
    # A tighter per-request TBT raises the step floor and lowers the bound.
    tight = [replace(r, tbt_slo_s=0.02) for r in reqs]
    assert throughput_bound([0.01, 0.001, 0.0, 0.0005, 0.0], tight, 0.05, 8, 2).rate < b.rate


def test_simulated_requests_are_scored_against_their_own_objectives():
    setup = small_setup(num_requests=60)
    specs = [replace(s, ttft_slo_s=1e-6 if s.index % 2 else 100.0, tbt_slo_s=100.0) for s in setup.requests(2.0)]
    _, res = run(setup, "sarathi", 2.0, specs=specs)
    results = to_request_results(res)
    assert [r.ttft_slo_s for r in results] == [s.ttft_slo_s for s in sorted(specs, key=lambda s: s.index)]
    # The impossible class misses, the relaxed one meets: half, whatever the run's defaults say.
    assert metrics.attainment(results, setup.sim.ttft_slo, setup.sim.tbt_slo) == pytest.approx(0.5)
