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
        d = WorkerDriver({tiny_model.path!r}, "--num-blocks", "32", stderr_to_file=True, tmp_dir={str(tmp_path)!r})
        reg = d.wait_registered()[0]
        print(reg.pid, reg.pool.name, d.stderr_path(0), flush=True)
        time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid_s, shm, stderr_path = driver.stdout.readline().split()
        worker_pid = int(pid_s)
        assert pid_alive(worker_pid) and shm in our_shm_segments()
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        assert wait_until(lambda: not pid_alive(worker_pid), timeout=20)
        assert wait_until(lambda: shm not in our_shm_segments(), timeout=10)
        # It exits quietly: no SystemExit traceback from a signal landing in its clean-up.
        err = open(stderr_path).read()
        assert "Traceback" not in err and "SystemExit" not in err, err
    finally:
        if driver.poll() is None:
            driver.kill()


def test_repeated_sigterm_exits_cleanly(tiny_model):
    d = WorkerDriver(tiny_model.path, "--num-blocks", "32", stderr_to_file=True)
    try:
        reg = d.wait_registered()[0]
        proc = d.procs[0]
        for _ in range(20):  # the later signals land in the clean-up and the interpreter's exit
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        assert proc.wait(30) == 128 + signal.SIGTERM
        err = open(d.stderr_path(0)).read()
        assert "Traceback" not in err and "SystemExit" not in err, err
        assert reg.pool.name not in our_shm_segments()
    finally:
        d.close()
    assert not os.path.exists(d.tmp)  # the socket folder goes with the driver


def test_a_bad_sampling_value_fails_only_its_request(tiny_model):
    """temperature NaN passes the message schema; its row fails, its batch-mates finish right."""
    from tests.runtime_utils import greedy, make_engine, run_all

    prompts = {"a": list(range(10, 40)), "b": list(range(50, 60)), "c": list(range(70, 99))}
    want, _ = run_all(make_engine(tiny_model), list(prompts.values()), greedy(10, ignore_eos=True))
    want = dict(zip(prompts, want))
    d = WorkerDriver(tiny_model.path, "--num-blocks", "64", "--chunk-size", "512", "--fail-sampling", "c2",
                     "--dtype", "float32")
    try:
        d.wait_registered()
        for rid, p in prompts.items():
            d.send(0, AddRequest(rid, p, greedy(10, ignore_eos=True), time.monotonic()))
        bad = SamplingParams(max_tokens=10, temperature=float("nan"), ignore_eos=True)
        d.send(0, AddRequest("nan", list(range(20, 45)), bad, time.monotonic()))
        d.send(0, AddRequest("c2", prompts["c"], greedy(10, ignore_eos=True), time.monotonic()))  # injected
        got = {rid: [] for rid in [*prompts, "nan", "c2"]}
        reasons, errors = {}, {}
        for step in d.steps():
            for out in step.outputs:
                got[out.request_id].extend(out.new_token_ids)
                if out.finish_reason:
                    reasons[out.request_id], errors[out.request_id] = out.finish_reason, out.error
            if len(reasons) == 5:
                break
        assert reasons == {"a": "length", "b": "length", "c": "length", "nan": "error", "c2": "error"}
        assert "temperature=nan" in errors["nan"] and "injected" in errors["c2"]
        assert {rid: got[rid] for rid in prompts} == want
        assert step.free_blocks == step.total_blocks
        assert d.procs[0].poll() is None  # still serving
    finally:
        d.close()


def test_fatal_device_error_ends_the_worker(tiny_model):
    """A fatal device error is not served as a per-batch error: the worker reports and exits."""
    from ascendra.messages import WorkerFailed

    d = WorkerDriver(tiny_model.path, "--num-blocks", "32", "--fail-fatal", "boom")
    try:
        reg = d.wait_registered()[0]
        d.send(0, AddRequest("boom", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0), time.monotonic()))
        msg = d.recv(60)
        assert isinstance(msg, WorkerFailed) and "illegal memory access" in msg.message
        assert d.procs[0].wait(30) == 1
        assert reg.pool.name not in our_shm_segments()
    finally:
        d.close()
