"""A worker process driven over real ZeroMQ sockets."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ascendra.messages import AbortRequests, AddRequest, SamplingParams, Shutdown
from tests.helpers import our_shm_segments, pid_alive, wait_until
from workers.driver import WorkerDriver

pytestmark = pytest.mark.e2e


@pytest.fixture
def driver(tiny_model):
    d = WorkerDriver(tiny_model.path, "--num-blocks", "128", "--chunk-size", "64", "--policy", "sarathi")
    yield d
    d.close()


def test_twenty_requests_three_aborted(driver):
    reg = driver.wait_registered()[0]
    assert reg.num_blocks == 128 and reg.block_size == 16 and reg.pool.kind == "shm"
    assert reg.model.vocab_size > 0 and reg.pid == driver.procs[0].pid
    want = {}
    for i in range(20):
        n = 20 + 3 * i
        want[f"q{i}"] = n
        sp = SamplingParams(max_tokens=n, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True)
        driver.send(0, AddRequest(f"q{i}", list(range(5, 5 + 10 + i * 7)), sp, time.monotonic()))
    aborted = {"q3", "q11", "q17"}
    got = {rid: 0 for rid in want}
    reasons = {}
    sent_abort = False
    for step in driver.steps():
        for out in step.outputs:
            got[out.request_id] += len(out.new_token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        if not sent_abort and min(got[r] for r in aborted) >= 2:
            driver.send(0, AbortRequests(sorted(aborted)))
            sent_abort = True
        if len(reasons) == 20:
            final = step
            break
    for rid, n in want.items():
        if rid in aborted:
            assert reasons[rid] == "abort" and 2 <= got[rid] < n
        else:
            assert reasons[rid] == "length" and got[rid] == n
    assert final.free_blocks == final.total_blocks == 128
    assert final.num_running == final.num_waiting == 0

    driver.send(0, Shutdown())
    assert driver.procs[0].wait(30) == 0
    assert reg.pool.name not in our_shm_segments()


def test_bad_requests_fail_alone(tiny_model):
    d = WorkerDriver(tiny_model.path, "--num-blocks", "8", "--max-model-len", "256")
    try:
        d.wait_registered()
        sp = SamplingParams(max_tokens=4, temperature=0.0)
        d.send(0, AddRequest("ok1", [1, 2, 3], sp, time.monotonic()))
        d.send(0, AddRequest("long", list(range(10, 400)), sp, time.monotonic()))
        d.send(0, AddRequest("huge", list(range(10, 110)), SamplingParams(max_tokens=100), time.monotonic()))
        d.send(0, AddRequest("ok2", [4, 5, 6], sp, time.monotonic()))
        reasons, errors, counts = {}, {}, {"ok1": 0, "ok2": 0}
        for step in d.steps():
            for out in step.outputs:
                if out.request_id in counts:
                    counts[out.request_id] += len(out.new_token_ids)
                if out.finish_reason:
                    reasons[out.request_id] = out.finish_reason
                    errors[out.request_id] = out.error
            if len(reasons) == 4:
                break
        assert reasons["long"] == "error" and "limit is 256" in errors["long"]
        assert reasons["huge"] == "error" and "KV blocks" in errors["huge"]
        assert counts == {"ok1": 4, "ok2": 4}
        assert step.free_blocks == step.total_blocks
    finally:
        d.close()


def test_worker_exits_when_its_coordinator_dies(tiny_model, tmp_path):
    """Kill -9 the process driving the worker: the worker notices and exits, no orphan."""
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from workers.driver import WorkerDriver
        d = WorkerDriver({tiny_model.path!r}, "--num-blocks", "32")
        reg = d.wait_registered()[0]
        print(reg.pid, reg.pool.name, flush=True)
        time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid_s, shm = driver.stdout.readline().split()
        worker_pid = int(pid_s)
        assert pid_alive(worker_pid) and shm in our_shm_segments()
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        assert wait_until(lambda: not pid_alive(worker_pid), timeout=20)
        assert wait_until(lambda: shm not in our_shm_segments(), timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
