"""Issue 14, first part: when the hardware cannot meet the objectives for the load, Ascendra
degrades to throughput instead of pacing for objectives nothing can meet.

The reported collapse, reproduced in the simulator on the real schedulers and policies: two
instances of SmolLM2 on a 2-core CPU (a 16-decode step ~0.14 s against a 0.15 s TBT objective),
256-token prompts and 64-token outputs, TTFT 1.0 s / TBT 0.15 s. Before the fix Ascendra served a
saturated burst at 0.43x Sarathi's throughput with mean TTFTs of minutes, because it held every
decode at the TBT objective and kept its HP idle for escalations that could save nobody.
"""

from __future__ import annotations

import pytest

from ascendra.perf_model import PerfModel
from ascendra.sim import costs
from ascendra.sim.engine import SimConfig, Simulator
from ascendra.sim.scenarios import CPU_SMOLLM2_COEF
from ascendra.sim.sweep import to_request_results
from bench import metrics
from bench.workloads import RequestSpec, WorkloadConfig, build_workload

TTFT, TBT = 1.0, 0.15
MODEL = PerfModel.from_list(list(CPU_SMOLLM2_COEF))


def test_the_cost_model_is_too_slow_for_the_objectives():
    assert 0.10 <= MODEL.step_time(0, 16, 16 * 300) <= 0.18  # 16 decodes: at the TBT objective
    assert 0.6 <= MODEL.prefill_time(512) <= 0.7


def workload(rate: float, n: int = 200) -> list[RequestSpec]:
    if rate == float("inf"):  # vllm bench serve --request-rate inf: everything at once
        return [RequestSpec(i, 0.0, 256, 64) for i in range(n)]
    return build_workload(WorkloadConfig(dataset="fixed", num_requests=n, rate=rate, prompt_len=256,
                                         output_len=64, seed=0))


def point(policy: str, specs: list[RequestSpec], admission: bool = False) -> tuple[dict, Simulator]:
    cfg = SimConfig(policy=policy, num_instances=2, num_hp=1, num_blocks=4096, block_size=16,
                    max_num_seqs=128, chunk_size=512, max_model_len=2048, ttft_slo=TTFT, tbt_slo=TBT,
                    check_invariants=True, admission=admission)
    sim = Simulator(cfg, MODEL, MODEL, costs.MigrationCost(32 * 1024, 16, 25e9, 1e-3))
    res = sim.run(specs)
    return metrics.summarize(to_request_results(res), res.end_time, TTFT, TBT), sim


@pytest.mark.parametrize("rate", [1.0, 3.0, float("inf")])
def test_ascendra_is_never_below_the_better_baseline(rate):
    specs = workload(rate)
    base = {p: point(p, specs)[0] for p in ("vllm", "sarathi")}
    ours, sim = point("ascendra", specs)
    best_thr = max(s["request_throughput_rps"] for s in base.values())
    best_att = max(s["attainment"] for s in base.values())
    assert ours["completed"] == len(specs)
    assert ours["attainment"] >= best_att
    # Throughput within 3% of the better baseline (before the fix: 0.43x saturated). Measured over
    # 5 seeds: >= 0.999x at 1 req/s, >= 0.985x at 3 req/s, 0.98x saturated (the tail: the LP and
    # the HP finish their last requests a little apart).
    assert ours["request_throughput_rps"] >= 0.97 * best_thr
    if rate == float("inf"):
        # Everyone but the first few is judged hopeless, and the count says so.
        policy_hopeless = sim.policy.num_hopeless
        worker_hopeless = sum(i.scheduler.num_hopeless for i in sim.instances)
        assert policy_hopeless + worker_hopeless >= len(specs) // 2
        assert ours["ttft_mean_s"] <= 1.5 * base["sarathi"]["ttft_mean_s"]  # was 3.7x


def test_hp_is_not_left_idle_when_nobody_can_be_saved():
    """Saturated: the HP serves its share of the best-effort work (before the fix it took ~3
    requests and idled while the LP's queue missed every TTFT)."""
    _, sim = point("ascendra", workload(float("inf")))
    lp, hp = sim.instances
    assert hp.busy_s >= 0.8 * lp.busy_s


def test_admission_refuses_what_would_miss_and_serves_the_rest_in_time():
    """--admission: overloaded at 3 req/s, requests predicted to miss their TTFT are refused at
    arrival (counted as misses); those admitted mostly make their objectives, and attainment
    is no lower than without admission."""
    specs = workload(3.0)
    plain, _ = point("ascendra", specs)
    gated, sim = point("ascendra", specs, admission=True)
    assert sim.num_rejected > 0
    assert gated["failed"] == sim.num_rejected  # every refusal is a failed request, nothing else
    assert gated["attainment"] >= plain["attainment"]
    admitted = len(specs) - sim.num_rejected
    assert gated["slo_met"] >= 0.5 * admitted
