"""The streaming client against bench/stub.py (fast, no model): parsing, probing, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import promtext, stub
from bench.client import ClientConfig, FatalError, RunState, apply_chunk, run
from bench.metrics import RequestResult
from bench.server_process import free_port, http_get
from bench.workloads import RequestSpec

ROOT = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def stub_server(**kw):
    runner, server, port = await stub.start(stub.StubConfig(**kw))
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def specs(lens: list[tuple[int, int]], gap: float = 0.0) -> list[RequestSpec]:
    return [RequestSpec(i, i * gap, p, o) for i, (p, o) in enumerate(lens)]


async def go(cfg: ClientConfig, sp: list[RequestSpec]) -> RunState:
    state = RunState()
    await run(sp, cfg, state)
    return state


def test_apply_chunk_counts_tokens_and_usage():
    r = RequestResult(index=0, prompt_len=3, output_len=3, scheduled_s=0.0)
    apply_chunk(r, {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}, 1.0, True)
    apply_chunk(r, {"choices": [{"index": 0, "text": "", "finish_reason": None}]}, 1.1, True)
    apply_chunk(r, {"choices": [{"index": 0, "text": "bc", "token_ids": [5, 6], "finish_reason": "length"}]}, 1.2, True)
    apply_chunk(r, {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}, 1.3, True)
    assert r.token_times_s == [1.0, 1.1, 1.2] and r.chunk_tokens == [1, 1, 2]
    assert r.output_text == "abc" and r.output_ids == [5, 6] and r.finish_reason == "length"
    apply_chunk(r, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, 1.4, True)
    assert r.n_out == 4 and r.prompt_tokens == 3
    assert apply_chunk(r, {"error": {"message": "boom"}}, 1.5, False) == "boom"


@pytest.mark.asyncio
async def test_streams_and_timestamps_every_token():
    async with stub_server() as (server, url):
        st = await go(ClientConfig(base_url=url), specs([(20, 5), (30, 8)], gap=0.05))
    assert st.model == "stub-model"
    assert st.caps.prompt_mode == "token_ids" and st.caps.extensions and st.caps.usage
    assert all(r.success for r in st.results), [r.error for r in st.results]
    assert [r.n_out for r in st.results] == [5, 8]
    assert [len(r.token_times_s) for r in st.results] == [5, 8]
    assert [r.prompt_tokens for r in st.results] == [20, 30]
    for r in st.results:
        assert r.send_s <= r.token_times_s[0] <= r.token_times_s[-1] <= r.end_s
    # The server saw exact token-id prompts with ignore_eos/min_tokens.
    bodies = [b for _, b in server.received if b["max_tokens"] != 2]  # drop the probe
    assert [len(b["prompt"]) for b in bodies] == [20, 30]
    assert all(b["ignore_eos"] and b["min_tokens"] == b["max_tokens"] for b in bodies)
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)


@pytest.mark.asyncio
async def test_probe_falls_back_to_text_on_4xx():
    async with stub_server(reject_token_ids=True) as (server, url):
        st = await go(ClientConfig(base_url=url), specs([(12, 4)]))
    assert st.caps.prompt_mode == "text"
    assert any("rejected" in n for n in st.caps.notes)
    assert st.results[0].success and st.results[0].prompt_tokens == 12
    assert isinstance(server.received[-1][1]["prompt"], str)


@pytest.mark.asyncio
async def test_probe_drops_extensions_when_rejected():
    async with stub_server(reject_extensions=True, eos_after=3) as (server, url):
        st = await go(ClientConfig(base_url=url), specs([(10, 8)]))
    assert st.caps.prompt_mode == "token_ids" and not st.caps.extensions
    # Without ignore_eos a shorter output is the server's choice, not a failure.
    assert st.results[0].success and st.results[0].n_out == 3


@pytest.mark.asyncio
async def test_record_outputs_uses_token_ids_when_supported():
    async with stub_server() as (server, url):
        st = await go(ClientConfig(base_url=url, record_outputs=True), specs([(10, 4)]))
    r = st.results[0]
    assert st.caps.token_ids and len(r.output_ids) == 4 and r.output_text
    async with stub_server(return_token_ids=False) as (server, url):
        st = await go(ClientConfig(base_url=url, record_outputs=True), specs([(10, 4)]))
    assert not st.caps.token_ids and st.results[0].output_ids is None and st.results[0].output_text
    assert any("return_token_ids" in n for n in st.caps.notes)


@pytest.mark.asyncio
async def test_every_failure_kind_is_counted_with_reason():
    faults = {11: "http500", 12: "error_event", 13: "no_done", 14: "short", 15: "hang", 16: "drop"}
    async with stub_server(faults=faults) as (server, url):
        cfg = ClientConfig(base_url=url, timeout_s=1.0, abort_after=100)
        st = await go(cfg, specs([(10, 6)] + [(p, 6) for p in faults]))
    errs = {r.prompt_len: r.error for r in st.results}
    assert errs[10] is None and st.results[0].success
    assert errs[11].startswith("http 500")
    assert errs[12].startswith("error event: injected error")
    assert errs[13].startswith("no [DONE]")
    assert errs[14].startswith("short output: 3 of 6")
    assert errs[15].startswith("timeout")
    assert errs[16].startswith(("connection error", "no [DONE]"))
    assert sum(not r.success for r in st.results) == 6


@pytest.mark.asyncio
async def test_max_concurrency_limits_in_flight():
    async with stub_server() as (server, url):
        running: list[int] = []
        cfg = ClientConfig(base_url=url, max_concurrency=2, prompt_mode="token_ids")

        async def watch():
            while True:
                running.append(server.running)
                await asyncio.sleep(0.002)

        w = asyncio.create_task(watch())
        st = await go(cfg, specs([(5, 10)] * 8))
        w.cancel()
    assert all(r.success for r in st.results)
    assert max(running) <= 2


@pytest.mark.asyncio
async def test_unreachable_server_is_fatal_and_fast():
    cfg = ClientConfig(base_url="http://127.0.0.1:9", connect_timeout_s=5)
    with pytest.raises(FatalError, match="cannot reach server"):
        await go(cfg, specs([(5, 5)]))


@pytest.mark.asyncio
async def test_connection_failures_abort_the_run_and_mark_the_rest():
    cfg = ClientConfig(base_url="http://127.0.0.1:9", model="m", prompt_mode="token_ids", abort_after=3)
    st = await go(cfg, specs([(5, 5)] * 20, gap=0.01))
    assert st.abort_reason and "consecutive connection failures" in st.abort_reason
    assert all(not r.success and r.error for r in st.results)
    assert any(r.error.startswith("not sent") for r in st.results)


# ------------------------------------------------------------------ the CLI, as a user runs it


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.fixture
def stub_proc(tmp_path):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "bench.stub", "--port", str(port), "--tbt", "0.01"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if http_get(url + "/health", 1.0)[0] == 200:
            break
        time.sleep(0.05)
    yield p, url
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.e2e
def test_cli_last_line_is_json_and_file_written(stub_proc, tmp_path):
    _, url = stub_proc
    out = tmp_path / "r.json"
    res = cli("--base-url", url + "/v1", "--dataset", "uniform", "--rate", "50", "--num-requests", "12",
              "--prompt-len", "16", "--output-len", "6", "--json", str(out), "--ttft-slo", "5", "--tbt-slo", "5")
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for k in ("completed", "failed", "attainment", "goodput_rps", "output_tok_s", "ttft_p50_s", "ttft_p99_s",
              "tbt_mean_p50_s", "tbt_mean_p99_s"):
        assert k in last
    assert last["completed"] == 12 and last["failed"] == 0 and last["attainment"] == 1.0
    assert "Serving Benchmark Result" in res.stdout and "token_ids" in res.stdout
    data = json.loads(out.read_text())
    assert len(data["requests"]) == 12
    r0 = data["requests"][0]
    assert r0["ttft_s"] > 0 and len(r0["token_times_s"]) == r0["n_out"] == r0["output_len"]


@pytest.mark.e2e
def test_cli_trace_replay_keeps_relative_timing(stub_proc, tmp_path):
    _, url = stub_proc
    gaps = [0.0, 0.3, 0.05, 0.6, 0.0, 0.25, 0.4, 0.1]
    t, rows = 1000.0, ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for g in gaps:
        t += g
        rows.append(f"{t:.4f},{20 + len(rows)},4")
    trace = tmp_path / "t.csv"
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    res = cli("--base-url", url, "--trace", str(trace), "--json", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    reqs = json.loads(out.read_text())["requests"]
    offsets = [sum(gaps[1:i + 1]) for i in range(len(gaps))]
    assert [r["scheduled_s"] for r in reqs] == pytest.approx(offsets)
    # Never early, in trace order; lateness bounded loosely (a loaded CI box may lag).
    sends = [r["send_s"] for r in reqs]
    assert all(s >= o - 1e-6 for s, o in zip(sends, offsets))
    assert sends == sorted(sends)
    assert max(s - o for s, o in zip(sends, offsets)) < 1.0


@pytest.mark.e2e
def test_cli_bad_url_gives_clear_error_and_partial_json(tmp_path):
    out = tmp_path / "r.json"
    res = cli("--base-url", "http://127.0.0.1:9", "--rate", "5", "--num-requests", "4", "--json", str(out),
              timeout=60)
    assert res.returncode == 1
    assert "cannot reach server at http://127.0.0.1:9" in res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["completed"] == 0 and last["failed"] == 4 and "cannot reach" in last["error"]
    data = json.loads(out.read_text())
    assert all(r["error"].startswith("not sent: cannot reach server") for r in data["requests"])


@pytest.mark.e2e
def test_cli_server_killed_mid_run(stub_proc, tmp_path):
    proc, url = stub_proc
    out = tmp_path / "r.json"
    client = subprocess.Popen(
        [sys.executable, "-m", "bench.serve", "--base-url", url, "--rate", "20", "--num-requests", "200",
         "--prompt-len", "8", "--output-len", "40", "--json", str(out), "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill once tokens are flowing (the stub counts them in /metrics).
    for _ in range(400):
        status, text = http_get(url + "/metrics", 1.0)
        if status == 200 and promtext.parse(text).get("ascendra:generation_tokens_total", 0) > 50:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = client.communicate(timeout=120)
    assert client.returncode == 1
    assert "error:" in stderr
    last = json.loads(stdout.strip().splitlines()[-1])
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["completed"] + s["failed"] == s["num_requests"] == 200 == last["completed"] + last["failed"]
    assert s["failed"] > 0
    reasons = {r["error"].split(":")[0] for r in data["requests"] if r["error"]}
    assert reasons <= {"connection error", "no [DONE]", "not sent", "cancelled", "timeout"}
    assert all(r["error"] for r in data["requests"] if not r["success"])


@pytest.mark.e2e
def test_compare_sweep_against_stub_and_resume(tmp_path):
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "bench.compare", "--server-cmd", "{python} -m bench.stub --port {port} --tbt 0.005",
            "--policies", "vllm,ascendra", "--rates", "5,20", "--dataset", "fixed", "--num-requests", "6",
            "--prompt-len", "8", "--output-len", "4", "--out", str(out), "--check-outputs", "--warmup", "1",
            "--startup-timeout", "60"]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["capacity_rps"]) == {"vllm", "ascendra"}
    assert len(summary["points"]) == 4
    assert summary["slo"]["source"].startswith("5x unloaded latency")
    assert summary["output_check"]["identical"]
    assert (out / "attainment.png").stat().st_size > 1000
    assert "| policy | capacity (req/s) |" in (out / "summary.md").read_text()
    assert json.loads(res.stdout.strip().splitlines()[-1])["complete"]
    # Resume: every point is on disk, so no server is started and nothing is re-measured.
    mtimes = {p: p.stat().st_mtime for p in (out / "points").rglob("*.json")}
    res2 = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in (out / "points").rglob("*.json")} == mtimes
    assert "starting" not in res2.stderr


@pytest.mark.e2e
def test_compare_interleaves_policies_point_by_point_and_adds_repeats(tmp_path):
    out = tmp_path / "cmp"
    base = [sys.executable, "-m", "bench.compare", "--server-cmd", "{python} -m bench.stub --port {port} --tbt 0.002",
            "--policies", "vllm,ascendra", "--rates", "5,20", "--dataset", "fixed", "--num-requests", "4",
            "--prompt-len", "8", "--output-len", "3", "--out", str(out), "--ttft-slo", "5", "--tbt-slo", "5",
            "--warmup", "0", "--check-outputs", "--interleave", "--startup-timeout", "60"]
    res = subprocess.run(base + ["--repeats", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    points = [json.loads(f.read_text()) for f in (out / "points").rglob("*.json")]
    assert sorted(f.name for f in (out / "points" / "vllm").iterdir()) == [
        "rate_20.json", "rate_20_rep1.json", "rate_5.json", "rate_5_rep1.json"]
    # Both servers were up at once and took turns, the order reversed from one point to the next.
    order = [(pt["rate"], pt["repeat"], pt["policy"]) for pt in sorted(points, key=lambda pt: pt["started_unix"])]
    assert order == [(5.0, 0, "vllm"), (5.0, 0, "ascendra"), (5.0, 1, "ascendra"), (5.0, 1, "vllm"),
                     (20.0, 0, "vllm"), (20.0, 0, "ascendra"), (20.0, 1, "ascendra"), (20.0, 1, "vllm")]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 8 and {pt["repeats"] for pt in summary["pooled"]} == {2}
    assert [len(v) for v in summary["capacity_by_repeat"].values()] == [2, 2]
    assert summary["output_check"]["policies"]["ascendra"]["compared"] == 16
    assert "Capacity of each repeat on its own" in (out / "summary.md").read_text()
    # A third repeat later measures only the new points; the saved ones are kept.
    mtimes = {f: f.stat().st_mtime for f in (out / "points").rglob("*.json")}
    res = subprocess.run(base + ["--repeats", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {f: f.stat().st_mtime for f in mtimes} == mtimes
    assert len(list((out / "points").rglob("*_rep2.json"))) == 4


@pytest.mark.e2e
def test_compare_extends_a_sweep_with_new_rates(tmp_path):
    out = tmp_path / "cmp"
    base = [sys.executable, "-m", "bench.compare", "--server-cmd", "{python} -m bench.stub --port {port}",
            "--policies", "vllm", "--dataset", "fixed", "--num-requests", "4", "--prompt-len", "8",
            "--output-len", "3", "--out", str(out), "--ttft-slo", "5", "--tbt-slo", "5", "--warmup", "0"]
    res = subprocess.run(base + ["--rates", "10"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    first = out / "points" / "vllm" / "rate_10.json"
    mtime = first.stat().st_mtime
    res = subprocess.run(base + ["--rates", "10,20"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert first.stat().st_mtime == mtime  # kept, not re-measured
    summary = json.loads((out / "summary.json").read_text())
    assert [pt["rate"] for pt in summary["points"]] == [10.0, 20.0]
    assert summary["slo"]["source"] == "given"
    # A different workload in the same directory is refused instead of mixed in.
    res = subprocess.run(base + ["--rates", "10", "--output-len", "9"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "different config" in res.stderr


@pytest.mark.e2e
def test_compare_reports_a_server_that_does_not_start(tmp_path):
    out = tmp_path / "cmp"
    res = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--server-cmd", "{python} -c 'print(\"no model here\"); exit(3)'",
         "--policies", "vllm,sarathi", "--rates", "1", "--num-requests", "2", "--out", str(out),
         "--ttft-slo", "1", "--tbt-slo", "1", "--startup-timeout", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "exited with status 3" in res.stderr and "no model here" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["errors"]) == {"vllm", "sarathi"} and summary["points"] == []


@pytest.mark.asyncio
async def test_slo_classes_are_sent_per_request_and_scored_per_request():
    from bench import metrics
    from bench.args import parse_slo_classes
    from bench.workloads import WorkloadConfig, build_workload

    classes = parse_slo_classes("0.5:0.25:0.1,0.5:5:0.25")
    sp = build_workload(WorkloadConfig(dataset="code", num_requests=8, rate=float("inf"), slo_classes=classes,
                                       max_prompt_len=64, max_output_len=4, seed=3))
    assert {(s.ttft_slo_s, s.tbt_slo_s) for s in sp} == {(0.25, 0.1), (5.0, 0.25)}
    async with stub_server() as (server, url):
        st = await go(ClientConfig(base_url=url, send_slo=True, ttft_slo_s=1.0, tbt_slo_s=0.15), sp)
    bodies = {b["max_tokens"]: b for _, b in server.received if "ttft_slo_ms" in b}
    sent = sorted((b["ttft_slo_ms"], b["tbt_slo_ms"]) for _, b in server.received if "ttft_slo_ms" in b)
    assert bodies and sent == sorted((s.ttft_slo_s * 1000.0, s.tbt_slo_s * 1000.0) for s in sp)
    assert [(r.ttft_slo_s, r.tbt_slo_s) for r in st.results] == [(s.ttft_slo_s, s.tbt_slo_s) for s in sp]
    # A request with a TTFT between the two classes' objectives meets only the loose one.
    r = st.results[0]
    r.token_times_s = [r.send_s + 1.0]
    r.success = True
    assert metrics.meets_slo(r, 100.0, 100.0) == (r.ttft_slo_s == 5.0)


def test_slo_classes_and_burst_cv_parse_or_refuse():
    import argparse

    from bench.args import parse_slo_classes
    from bench.serve import build_parser, workload_from_args

    assert parse_slo_classes("0.3:0.25:0.1,0.7:5:0.25") == ((0.3, 0.25, 0.1), (0.7, 5.0, 0.25))
    for bad in ("0.3:0.25", "0.5:0.25:0.1", "1:x:0.1", "1:0:0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_slo_classes(bad)
    a = build_parser().parse_args(["--dataset", "longbench", "--rate", "2", "--burst-cv", "3",
                                   "--num-requests", "200", "--slo-classes", "0.3:0.25:0.1,0.7:5:0.25"])
    sp = workload_from_args(a)
    gaps = [b.arrival_s - x.arrival_s for x, b in zip(sp, sp[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 1.5  # Poisson would be near 1
    assert all(s.ttft_slo_s in (0.25, 5.0) for s in sp)
