"""The benchmark client against the REAL server (python -m ascendra.server --model tiny)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import promtext
from bench.client import ClientConfig
from bench.runner import execute
from bench.server_process import ServerProcess, free_port, http_get
from bench.workloads import RequestSpec

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def start_server(tmp: Path, *extra: str) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "ascendra.server", "--host", "127.0.0.1", "--port", str(port),
           "--model", "tiny", "--num-instances", "2", *extra]
    srv = ServerProcess(cmd, port, tmp / "server.log")
    srv.start()
    try:
        srv.wait_healthy(120)
    except RuntimeError:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


def scrape(url: str) -> dict[str, float]:
    status, text = http_get(url + "/metrics", 10)
    assert status == 200
    return promtext.parse(text)


def test_client_agrees_with_server_metrics(server):
    url = server.base_url
    before = scrape(url)
    specs = [RequestSpec(i, i * 0.15, 16 + 8 * (i % 4), 4 + (i % 5)) for i in range(16)]
    # Fixed prompt mode: no probe request, so the server counted exactly our requests.
    cfg = ClientConfig(base_url=url, prompt_mode="token_ids", ttft_slo_s=10, tbt_slo_s=10)
    res = execute(specs, cfg, progress=False)
    assert res["error"] is None
    s = res["summary"]
    assert s["completed"] == 16 and s["failed"] == 0
    assert [r["n_out"] for r in res["requests"]] == [sp.output_len for sp in specs]
    client_ttft_sum = sum(r["ttft_s"] for r in res["requests"])
    # The server may bump counters just after [DONE]; wait for them to settle.
    for _ in range(50):
        d = promtext.delta(before, scrape(url))
        if d.get("ascendra:time_to_first_token_seconds_count", 0) >= 16:
            break
        time.sleep(0.1)
    assert d["ascendra:generation_tokens_total"] == s["total_output_tokens"]
    assert d["ascendra:prompt_tokens_total"] == sum(sp.prompt_len for sp in specs)
    assert d["ascendra:time_to_first_token_seconds_count"] == 16
    server_ttft_sum = d["ascendra:time_to_first_token_seconds_sum"]
    # The client's TTFT adds network and HTTP time on top of the server's own.
    assert abs(client_ttft_sum - server_ttft_sum) <= 0.5 * server_ttft_sum + 0.5


def test_probe_picks_token_ids_and_extensions(server):
    res = execute([RequestSpec(0, 0.0, 10, 6)], ClientConfig(base_url=server.base_url), progress=False)
    srv = res["server"]
    assert srv["model"] == "tiny" and srv["prompt_mode"] == "token_ids" and srv["ignore_eos"]
    assert srv["token_counts_from"] == "usage"
    assert res["requests"][0]["success"] and res["requests"][0]["n_out"] == 6


def test_trace_replay_keeps_relative_timing(server, tmp_path):
    gaps = [0.0, 0.4, 0.05, 0.7, 0.0, 0.3, 0.2]
    t, rows = 0.0, ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i, g in enumerate(gaps):
        t += g
        rows.append(f"{t:.3f},{20 + 3 * i},5")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "bench.serve", "--base-url", server.base_url, "--trace",
                          str(tmp_path / "t.csv"), "--json", str(out), "--quiet", "--ttft-slo", "10",
                          "--tbt-slo", "10"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["completed"] == len(gaps) and last["attainment"] == 1.0
    reqs = json.loads(out.read_text())["requests"]
    offsets = [sum(gaps[1:i + 1]) for i in range(len(gaps))]
    assert [r["scheduled_s"] for r in reqs] == pytest.approx(offsets)
    sends = [r["send_s"] for r in reqs]
    assert all(s >= o - 1e-6 for s, o in zip(sends, offsets)) and sends == sorted(sends)
    assert max(s - o for s, o in zip(sends, offsets)) < 1.0  # loose: a busy CI box may lag


def test_bad_url_is_quick_clear_and_partial(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "bench.serve", "--base-url", f"http://127.0.0.1:{free_port()}",
                          "--rate", "2", "--num-requests", "5", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot reach server" in res.stderr
    assert json.loads(out.read_text())["summary"]["failed"] == 5


def test_server_killed_mid_run(tmp_path):
    srv = start_server(tmp_path)
    out = tmp_path / "r.json"
    try:
        client = subprocess.Popen(
            [sys.executable, "-m", "bench.serve", "--base-url", srv.base_url, "--rate", "5", "--num-requests",
             "100", "--prompt-len", "16", "--output-len", "32", "--json", str(out), "--quiet", "--timeout", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # until tokens flow (not a timing assertion)
            status, text = http_get(srv.base_url + "/metrics", 2)
            if status == 200 and promtext.parse(text).get("ascendra:generation_tokens_total", 0) > 40:
                break
            time.sleep(0.05)
        os.killpg(srv.proc.pid, signal.SIGKILL)  # server and its workers, all at once
        srv.proc.wait()
        stdout, stderr = client.communicate(timeout=180)
    finally:
        srv.stop()
    assert client.returncode == 1, stderr
    assert "error:" in stderr
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["num_requests"] == 100 and s["completed"] + s["failed"] == 100
    assert s["failed"] > 0 and s["completed"] > 0
    assert all(r["error"] for r in data["requests"] if not r["success"])
    assert set(s["failure_reasons"]) <= {"connection error", "no [DONE]", "not sent", "cancelled", "timeout"}
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["failed"] == s["failed"]


def test_compare_all_policies_small_sweep(tmp_path):
    out = tmp_path / "cmp"
    res = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--model", "tiny", "--num-instances", "2", "--rates", "2,8",
         "--dataset", "fixed", "--num-requests", "8", "--prompt-len", "24", "--output-len", "6",
         "--out", str(out), "--check-outputs", "--warmup", "1", "--startup-timeout", "120"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["capacity_rps"]) == {"vllm", "sarathi", "ascendra"}
    assert len(summary["points"]) >= 4
    oc = summary["output_check"]
    assert all(v["compared"] > 0 for v in oc["policies"].values())
    assert (out / "attainment.png").exists() and (out / "summary.md").exists()
