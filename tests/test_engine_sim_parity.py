"""The simulator runs the worker's own code: the same requests through the worker's engine (tiny
model, real forward passes) and through the simulator (step times instead of the forward pass)
give the same batches, step by step."""

from __future__ import annotations

import pytest

from ascendra.messages import AddRequest, SamplingParams
from ascendra.perf_model import PerfModel
from ascendra.sim import costs
from ascendra.sim.engine import SimConfig, Simulator
from bench.workloads import RequestSpec
from tests.runtime_utils import make_engine

pytestmark = pytest.mark.e2e

STEP_S = 0.01  # every simulated step takes this long


class ConstantCost:
    def predict(self, shape) -> float:
        return STEP_S


def workload() -> list[RequestSpec]:
    # Arrivals off the step grid (so no arrival ties with a step's end), prompts that need
    # several chunks, and enough requests to fill the seats and make some wait.
    lengths = [(70, 6), (9, 12), (130, 3), (33, 9), (1, 5), (64, 7), (17, 1), (90, 4), (40, 10), (5, 8)]
    return [RequestSpec(i, 0.0037 + 0.0061 * i * i, p, o) for i, (p, o) in enumerate(lengths)]


def simulated_batches(policy: str, num_hp: int | None, specs, **cfg) -> list[tuple[float, list]]:
    sim_cfg = SimConfig(policy=policy, num_instances=1, num_hp=num_hp, scheduler_uses_model=False,
                        check_invariants=True, **cfg)
    sim = Simulator(sim_cfg, ConstantCost(), PerfModel(), costs.MigrationCost(1024))
    core = sim.instances[0].core
    plan, batches = core.plan, []

    def recording_plan(now: float):
        step = plan(now)
        if not step.is_empty:
            batches.append((now, [(s.seq.request_id, s.num_tokens, s.context_len) for s in step.scheduled]))
        return step

    core.plan = recording_plan  # records what the real plan returns; changes nothing
    res = sim.run(specs)
    assert all(s.error is None and s.num_output_tokens == s.max_tokens for s in res.requests)
    return batches


def engine_batches(tiny_model, local_policy: str, specs, times: list[float], **cfg) -> list[tuple[float, list]]:
    engine = make_engine(tiny_model, policy=local_policy, **cfg)
    pending = sorted(specs, key=lambda s: s.arrival_s)
    batches = []
    for now in times:
        while pending and pending[0].arrival_s <= now:  # what reached the worker by then
            s = pending.pop(0)
            sampling = SamplingParams(max_tokens=s.output_len, ignore_eos=True, temperature=0.0)
            # The simulator's prompts are token 1 repeated; the same ids here.
            assert engine.add_request(AddRequest(f"sim-{s.index}", [1] * s.prompt_len, sampling,
                                                 s.arrival_s, ttft_slo=1.0, tbt_slo=0.15)) is None
        result = engine.step(now)
        batches.append((now, [(s.seq.request_id, s.num_tokens, s.context_len) for s in result.sched.scheduled]))
    assert not pending and not engine.has_work()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return batches


@pytest.mark.parametrize("policy,num_hp,local", [("vllm", None, "vllm"), ("sarathi", None, "sarathi"),
                                                  ("ascendra", 0, "lp")])
def test_engine_and_simulator_run_the_same_batches(tiny_model, policy, num_hp, local):
    cfg = dict(num_blocks=64, block_size=16, chunk_size=48, max_num_seqs=4)
    specs = workload()
    sim = simulated_batches(policy, num_hp, specs, max_model_len=512, ttft_slo=1.0, tbt_slo=0.15, **cfg)
    assert len(sim) > 20 and any(len(b) > 1 for _, b in sim)
    real = engine_batches(tiny_model, local, specs, [t for t, _ in sim], max_model_len=512, **cfg)
    assert real == sim
