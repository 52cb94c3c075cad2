"""The closed Policy interface: every hook a caller uses is declared on the base class."""

import subprocess
import sys

from ascendra.messages import StepOutput
from ascendra.perf_model import PerfModel
from ascendra.policies import make_policy
from ascendra.predictor import AscendraPolicy
from ascendra.router import Policy, RoundRobinPolicy, RouteRequest, plan_instances

COEF = [0.010, 0.001, 0.0, 0.0005, 0.0]


def _step(iid: int, now: float) -> StepOutput:
    return StepOutput(worker_id=iid, step=1, outputs=[], num_seqs=1, num_prefill_tokens=0, num_decode_tokens=1,
                      prefill_context_tokens=0, decode_context_tokens=10, step_time=0.02, num_running=1,
                      num_waiting=0, num_preempted=0, free_blocks=90, total_blocks=100, time=now)


def test_a_baseline_takes_every_hook_the_coordinator_calls():
    pol = make_policy("vllm", plan_instances("vllm", 2))
    assert isinstance(pol, RoundRobinPolicy)
    for iid in (0, 1):
        pol.set_alive(iid, True)
        pol.configure_instance(iid, COEF, 512, 128, 16)
    req = RouteRequest("a", 10, 5, 0.0, ttft_slo=1.0)
    assert pol.would_miss(req) is False
    iid = pol.route(req)
    pol.on_dispatch(iid, req)
    assert pol.on_step(iid, _step(iid, 0.01)) == []
    pol.on_first_token("a")
    pol.on_tokens("a", 1, 0.01)
    pol.on_migrated("a", 1 - iid, 0.02)
    pol.on_migration_failed("a", 0.02)
    pol.on_finish("a")
    assert pol.step_time_model(iid) is None
    assert pol.num_hopeless == 0
    assert pol.instances[iid].num_assigned == 0 and pol.instances[iid].num_running == 1


def test_ascendra_exposes_its_step_time_model_and_hopeless_count():
    specs = plan_instances("ascendra", 2, 1)
    pol = make_policy("ascendra", specs)
    assert isinstance(pol, AscendraPolicy) and isinstance(pol, Policy)
    pol.configure_instance(0, COEF, 256, 8, 16)
    model = pol.step_time_model(0)
    assert isinstance(model, PerfModel) and model.to_list() == PerfModel.from_list(COEF).to_list()
    assert pol.num_hopeless == 0


def test_router_does_not_import_the_predictor():
    """make_policy lives above router and predictor: importing router pulls in neither."""
    code = "import sys, ascendra.router; print('ascendra.predictor' in sys.modules, 'ascendra.policies' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
