"""Escalation between two real worker processes: the coordinator's Migrator over ZeroMQ, KV through shm."""

import time

import pytest

from ascendra.messages import AddRequest, StepOutput
from ascendra.migrator import Migrator
from ascendra.router import Escalation
from tests.runtime_utils import greedy, make_engine, run_all
from workers.driver import WorkerDriver

pytestmark = pytest.mark.e2e

PROMPTS = {"dec": list(range(200, 260)), "pre": list(range(300, 620)), "stay": list(range(50, 90))}
N_OUT = 24


def test_escalation_between_worker_processes_keeps_greedy_output(tiny_model):
    names = list(PROMPTS)
    want, _ = run_all(make_engine(tiny_model, num_blocks=256), [PROMPTS[n] for n in names],
                      greedy(N_OUT, ignore_eos=True))
    want = dict(zip(names, want))
    d = WorkerDriver(tiny_model.path, "--num-blocks", "96", "--chunk-size", "32", "--profile", "off", "--dtype", "float32",
                     worker_ids=(0, 1))
    try:
        regs = d.wait_registered()
        assert regs[0].pool.kind == "shm"
        mig = Migrator(d.send)
        for name in names:
            d.send(0, AddRequest(name, PROMPTS[name], greedy(N_OUT, ignore_eos=True), time.monotonic()))
        tokens = {n: [] for n in names}
        done, results, last = set(), {}, {}
        started_pre = started_dec = False
        while len(done) < len(names) or mig.active:
            step = d.recv(60)
            assert isinstance(step, StepOutput)
            last[step.worker_id] = step
            for out in step.outputs:
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finish_reason:
                    assert out.finish_reason == "length"
                    done.add(out.request_id)
            for up in step.migrations:
                res = mig.on_update(step.worker_id, up, time.monotonic())
                if res is not None:
                    results[up.request_id] = res.migration
            # "pre" has 320 prompt tokens at 32 a step: still prefilling after the first steps.
            if not started_pre and step.worker_id == 0 and step.step >= 2:
                assert not tokens["pre"]
                mig.start(Escalation("pre", 0, 1), time.monotonic())
                started_pre = True
            if not started_dec and len(tokens["dec"]) >= 3:
                mig.start(Escalation("dec", 0, 1), time.monotonic())
                started_dec = True
        assert results["pre"].ok and results["pre"].kind == "kv" and results["pre"].tokens_at_freeze == 0
        assert results["dec"].ok and results["dec"].tokens_at_freeze >= 3 and results["dec"].blocks_copied >= 4
        assert tokens == want
        # Both pools end empty once the source has released its frozen copy.
        while any(last[w].free_blocks != last[w].total_blocks for w in (0, 1)):
            step = d.recv(10)
            last[step.worker_id] = step
    finally:
        d.close()
