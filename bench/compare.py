"""python -m bench.compare: capacity of each scheduling policy on the same workload.

For each policy it starts our server (`python -m ascendra.server ... --policy P`), waits for
/health, sweeps request rates with bench.serve's client (same requests, same seed), and
finds the rate where SLO attainment crosses 90%. Every measured point is saved as its own
JSON under --out/points/, so an interrupted sweep resumes where it stopped. Results:
summary.json, summary.md and attainment.png in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bench import metrics, promtext
from bench.client import ClientConfig
from bench.serve import (add_client_args, add_slo_args, add_workload_args, execute, load_trace_for,
                         workload_config, write_json)
from bench.workloads import RequestSpec, build_workload

DEFAULT_SERVER_CMD = ("{python} -m ascendra.server --host 127.0.0.1 --port {port} --model {model} "
                      "--num-instances {num_instances} --policy {policy}")
POLICIES = ("vllm", "sarathi", "ascendra")


# ------------------------------------------------------------------ server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess in its own process group (so its workers stop with it)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path) -> None:
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n$ {shlex.join(self.cmd)}\n".encode())
        log.flush()
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode} before it was "
                                   f"healthy; last log lines ({self.log_path}):\n{self.log_tail()}")
            if http_get(self.base_url + "/health", 2.0)[0] == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout_s:g}s; last log lines:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_get(url: str, timeout_s: float) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError, ValueError):
        return None, ""


def wait_idle(base_url: str, timeout_s: float) -> bool:
    """Wait until the server reports nothing running or queued (so one point's stragglers do
    not load the next). True when idle or when it exposes no such gauges."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, text = http_get(base_url + "/metrics", 5.0)
        if status != 200:
            return True
        m = promtext.parse(text)
        keys = [k for k in m if k.endswith(("num_requests_running", "num_requests_waiting",
                                            "coordinator_requests_inflight"))]
        if not keys or all(m[k] == 0 for k in keys):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


# ------------------------------------------------------------------ sweep bookkeeping


def rate_tag(rate: float) -> str:
    return f"rate_{rate:g}".replace(".", "p")


def point_path(out: Path, policy: str, rate: float) -> Path:
    return out / "points" / policy / f"{rate_tag(rate)}.json"


def load_point(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def point_row(policy: str, rate: float, result: dict) -> dict:
    s = result["summary"]
    keys = ("attainment", "attainment_p99_tbt", "goodput_rps", "completed", "failed", "num_requests",
            "request_throughput_rps", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "tbt_mean_p50_s",
            "tbt_mean_p99_s", "itl_p99_s", "e2e_p50_s", "failure_reasons")
    return {"policy": policy, "rate": rate} | {k: s.get(k) for k in keys} | {"error": result.get("error")}


def output_of(req: dict) -> list | str | None:
    return req.get("output_ids") if req.get("output_ids") is not None else req.get("output_text")


def check_outputs(results: dict[str, dict[float, dict]], policies: Sequence[str]) -> dict:
    """Compare per-request greedy outputs of every policy with the first one's, request by
    request (same seed -> same prompts), over requests that completed under both."""
    ref = policies[0]
    report: dict = {"reference": ref, "policies": {}}
    for pol in policies[1:]:
        compared, mismatches, examples = 0, 0, []
        for rate, res in sorted(results.get(pol, {}).items()):
            ref_res = results.get(ref, {}).get(rate)
            if ref_res is None:
                continue
            ref_reqs = {r["index"]: r for r in ref_res["requests"] if r["success"]}
            for r in res["requests"]:
                a = ref_reqs.get(r["index"])
                if not r["success"] or a is None:
                    continue
                oa, ob = output_of(a), output_of(r)
                if oa is None or ob is None:
                    continue
                compared += 1
                if oa != ob:
                    mismatches += 1
                    if len(examples) < 10:
                        pos = next((i for i, (x, y) in enumerate(zip(oa, ob)) if x != y), min(len(oa), len(ob)))
                        examples.append({"rate": rate, "index": r["index"], "first_diff_at": pos})
        report["policies"][pol] = {"compared": compared, "mismatches": mismatches, "examples": examples}
    report["identical"] = all(v["mismatches"] == 0 and v["compared"] > 0 for v in report["policies"].values())
    return report


# ------------------------------------------------------------------ reports


def markdown(summary: dict) -> str:
    pols = summary["policies"]
    caps = summary["capacity"]
    slo = summary["slo"]
    g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [
        f"SLOs: TTFT <= {g(slo['ttft_s'])} s, mean TBT <= {g(slo['tbt_s'])} s ({slo['source']}); "
        f"capacity = rate where attainment crosses {summary['threshold']:.0%}.",
        "",
        "| policy | capacity (req/s) |",
        "|---|---|",
    ]
    for p in pols:
        lines.append(f"| {p} | {metrics.Capacity(caps[p]['value'], caps[p]['bound']).label()} |")
    lines += ["", "Attainment by rate (p99-TBT variant in brackets):", "",
              "| rate (req/s) | " + " | ".join(pols) + " |", "|---" * (len(pols) + 1) + "|"]
    by = {(pt["policy"], pt["rate"]): pt for pt in summary["points"]}
    for rate in sorted({pt["rate"] for pt in summary["points"]}):
        cells = []
        for p in pols:
            pt = by.get((p, rate))
            cells.append("-" if pt is None else f"{pt['attainment']:.1%} ({pt['attainment_p99_tbt']:.1%})")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines += ["", "| policy | rate | completed | failed | TTFT p50 / p99 (s) | mean TBT p50 / p99 (s) | out tok/s |",
              "|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for pt in summary["points"]:
        lines.append(f"| {pt['policy']} | {pt['rate']:g} | {pt['completed']} | {pt['failed']} | "
                     f"{f(pt['ttft_p50_s'])} / {f(pt['ttft_p99_s'])} | "
                     f"{f(pt['tbt_mean_p50_s'])} / {f(pt['tbt_mean_p99_s'])} | {f(pt['output_tok_s'])} |")
    oc = summary.get("output_check")
    if oc:
        lines += ["", f"Greedy outputs vs {oc['reference']}: " + "; ".join(
            f"{p}: {v['mismatches']} of {v['compared']} differ" for p, v in oc["policies"].items())]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in summary["policies"]:
        pts = sorted((pt["rate"], pt["attainment"]) for pt in summary["points"] if pt["policy"] == p)
        if not pts:
            continue
        cap = metrics.Capacity(summary["capacity"][p]["value"], summary["capacity"][p]["bound"])
        ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=f"{p} (cap {cap.label()})")
    ax.axhline(summary["threshold"] * 100, color="grey", ls="--", lw=1)
    slo = summary["slo"]
    g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"{summary['config']['model']}, {summary['config']['num_instances']} instances; "
                 f"TTFT<={g(slo['ttft_s'])}s, TBT<={g(slo['tbt_s'])}s", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="passed to the server's --model")
    p.add_argument("--num-instances", type=int, default=3)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    p.add_argument("--rates", required=True, help="comma-separated request rates (req/s)")
    p.add_argument("--out", required=True, help="output directory (reused to resume)")
    p.add_argument("--threshold", type=float, default=0.9, help="attainment that defines capacity")
    p.add_argument("--stop-below", type=float, default=0.5,
                   help="skip a policy's higher rates once its attainment falls below this")
    p.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                   help="server command template ({python} {port} {model} {num_instances} {policy})")
    p.add_argument("--server-args", default="", help="extra arguments appended to the server command")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="wait this long between points for the server to go idle")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests after each start")
    p.add_argument("--slo-scale", type=float, default=5.0,
                   help="without --ttft-slo/--tbt-slo: SLO = this x unloaded TTFT / mean TBT of a "
                        "p90-length prompt, measured once on the first policy's server")
    p.add_argument("--check-outputs", action="store_true",
                   help="greedy runs; compare each request's output across policies")
    p.add_argument("--force", action="store_true", help="reuse --out even if its config differs")
    add_workload_args(p)
    add_client_args(p, timeout=120.0)
    add_slo_args(p, None, None)
    return p


def server_cmd(a: argparse.Namespace, policy: str, port: int, slo: dict | None) -> list[str]:
    cmd = a.server_cmd.format(python=shlex.quote(sys.executable), port=port, model=a.model,
                              num_instances=a.num_instances, policy=policy)
    extra = []
    if slo is not None and a.server_cmd == DEFAULT_SERVER_CMD:
        # Our server's defaults, for requests that do not carry their own SLO fields.
        extra = ["--ttft-slo", f"{slo['ttft_s']:.6g}", "--tbt-slo", f"{slo['tbt_s']:.6g}"]
    return shlex.split(cmd) + extra + shlex.split(a.server_args)


def calibrate(a: argparse.Namespace, specs: Sequence[RequestSpec], base_url: str) -> dict:
    """Unloaded latency, one request at a time, of a p90-length prompt of the workload (so
    that its long prompts can meet the TTFT SLO too) with the median output length."""
    prompt = round(metrics.percentile([s.prompt_len for s in specs], 90))
    output = max(8, round(metrics.percentile([s.output_len for s in specs], 50)))
    probe_specs = [RequestSpec(100_000 + i, 0.0, prompt, output) for i in range(3)]
    cfg = ClientConfig(base_url=base_url, timeout_s=a.timeout, max_concurrency=1, seed=a.seed,
                       prompt_mode=a.prompt_mode)
    res = execute(probe_specs, cfg, progress=False)
    reqs = [r for r in res["requests"] if r["success"]]
    if not reqs:
        raise RuntimeError(f"calibration failed: {res['error'] or res['summary']['failure_reasons']}")
    ttft = metrics.percentile([r["ttft_s"] for r in reqs], 50)
    tbt = metrics.percentile([r["mean_tbt_s"] for r in reqs if r["mean_tbt_s"] is not None], 50) or ttft
    return {"ttft_s": a.slo_scale * ttft, "tbt_s": a.slo_scale * tbt,
            "source": f"{a.slo_scale:g}x unloaded latency of a {prompt}-token prompt "
                      f"(TTFT {ttft:.3f}s, TBT {tbt:.4f}s)",
            "unloaded_ttft_s": ttft, "unloaded_tbt_s": tbt, "calibration_prompt_len": prompt,
            "calibration_output_len": output}


@dataclass
class Sweep:
    """State of one comparison: what is measured so far and what is left."""

    a: argparse.Namespace
    out: Path
    policies: list[str]
    rates: list[float]
    trace: list | None
    slo: dict | None
    results: dict[str, dict[float, dict]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def specs_at(self, rate: float) -> list[RequestSpec]:
        # Same seed at every rate: same lengths and prompts, arrival times scaled.
        return build_workload(workload_config(self.a, rate), self.trace)

    def below_floor(self, p: str, r: float) -> bool:
        """Attainment already fell under --stop-below at a lower rate: skip r."""
        return any(rr < r and res["summary"]["attainment"] < self.a.stop_below
                   for rr, res in self.results[p].items())

    def missing(self, p: str) -> list[float]:
        return [r for r in self.rates if r not in self.results[p]]

    def todo(self, p: str) -> list[float]:
        return [r for r in self.missing(p) if not self.below_floor(p, r)]

    def client_config(self, base_url: str) -> ClientConfig:
        a = self.a
        return ClientConfig(
            base_url=base_url, timeout_s=a.timeout, temperature=0.0 if a.check_outputs else a.temperature,
            seed=a.seed, send_slo=True, ttft_slo_s=self.slo["ttft_s"], tbt_slo_s=self.slo["tbt_s"],
            record_outputs=a.check_outputs or a.record_output_ids, max_concurrency=a.max_concurrency,
            abort_after=a.abort_after, prompt_mode=a.prompt_mode, extensions=not a.no_ignore_eos)

    def run_policy(self, p: str, bar) -> None:
        """Start p's server, measure its missing points, stop it. KeyboardInterrupt passes
        through; server trouble raises RuntimeError."""
        from tqdm import tqdm

        a = self.a
        port = free_port()
        with ServerProcess(server_cmd(a, p, port, self.slo), port, self.out / "logs" / f"{p}.log") as srv:
            bar.set_description(f"sweep: starting {p}")
            srv.wait_healthy(a.startup_timeout)
            base = self.specs_at(1.0)
            if a.warmup and base:
                warm = [RequestSpec(-1 - i, 0.0, min(16, base[0].prompt_len), 4) for i in range(a.warmup)]
                execute(warm, ClientConfig(base_url=srv.base_url, timeout_s=a.timeout, max_concurrency=1,
                                           prompt_mode=a.prompt_mode), progress=False)
            if self.slo is None:
                self.slo = calibrate(a, base, srv.base_url)
                write_json(str(self.out / "slo.json"), self.slo)
                tqdm.write(f"SLOs: TTFT {self.slo['ttft_s']:.3f}s, TBT {self.slo['tbt_s']:.4f}s "
                           f"({self.slo['source']}, on {p})", file=sys.stderr)
            for r in self.rates:
                if r in self.results[p]:
                    continue
                if self.below_floor(p, r):
                    bar.update(1)
                    continue
                bar.set_description(f"sweep: {p} @ {r:g} req/s")
                wait_idle(srv.base_url, a.drain_timeout)
                res = execute(self.specs_at(r), self.client_config(srv.base_url), progress=True,
                              desc=f"{p}@{r:g}", position=1)
                if res["interrupted"]:
                    raise KeyboardInterrupt
                res["policy"], res["rate"] = p, r
                self.results[p][r] = res
                write_json(str(point_path(self.out, p, r)), res)
                bar.update(1)
                s = res["summary"]
                tqdm.write(f"{p:>9} @ {r:g} req/s: attainment {s['attainment']:.1%}, completed "
                           f"{s['completed']}/{s['num_requests']}"
                           + (f", error: {res['error']}" if res["error"] else ""), file=sys.stderr)
                if res["error"] and s["sent"] < s["num_requests"]:
                    # The server died or stopped answering: the point is kept (its failures
                    # are real), the policy's higher rates are not measured.
                    raise RuntimeError(f"{p} server failed at {r:g} req/s: {res['error']}\n"
                                       f"last log lines:\n{srv.log_tail()}")


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    a = build_parser().parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    rates = sorted(float(r) for r in a.rates.split(","))

    # Everything that changes what a point measures; rates and policies may be added later.
    config = {k: getattr(a, k) for k in (
        "model", "num_instances", "server_cmd", "server_args", "dataset", "trace", "trace_start",
        "arrivals", "burstiness", "num_requests", "duration", "prompt_len", "output_len",
        "range_ratio", "prompt_scale", "output_scale", "max_prompt_len", "max_output_len", "seed",
        "max_concurrency", "timeout", "prompt_mode", "check_outputs", "ttft_slo", "tbt_slo", "slo_scale")}
    cfg_path = out / "config.json"
    old = load_point(cfg_path)
    if old is not None and old != json.loads(json.dumps(config)) and not a.force:
        diff = sorted(k for k in config if old.get(k) != config[k])
        print(f"error: {out} holds a sweep with a different config ({', '.join(diff)}); "
              f"use another --out or --force", file=sys.stderr)
        return 2
    write_json(str(cfg_path), config)

    slo = load_point(out / "slo.json")
    if a.ttft_slo is not None and a.tbt_slo is not None:
        slo = {"ttft_s": a.ttft_slo, "tbt_s": a.tbt_slo, "source": "given"}
    sweep = Sweep(a, out, policies, rates, load_trace_for(a), slo)
    for p in policies:
        sweep.results[p] = {r: res for r in rates if (res := load_point(point_path(out, p, r))) is not None}

    bar = tqdm(total=sum(len(sweep.missing(p)) for p in policies), desc="sweep", unit="point", position=0,
               file=sys.stderr, dynamic_ncols=True)
    interrupted = False
    try:
        for p in policies:
            if not sweep.todo(p):
                bar.update(len(sweep.missing(p)))
                continue
            try:
                sweep.run_policy(p, bar)
            except RuntimeError as e:  # never healthy, calibration failed, died mid-sweep
                sweep.errors[p] = str(e).splitlines()[0]
                tqdm.write(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("interrupted: saved points are kept; run the same command to resume", file=sys.stderr)
    finally:
        bar.close()

    summary = summarize_sweep(sweep.results, policies, rates, sweep.slo, a.threshold, config)
    summary["errors"] = sweep.errors
    if a.check_outputs:
        summary["output_check"] = check_outputs(sweep.results, policies)
    write_json(str(out / "summary.json"), summary)
    (out / "summary.md").write_text(markdown(summary))
    if summary["points"]:
        plot(summary, out / "attainment.png")
    print(markdown(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'attainment.png'}", file=sys.stderr)
    print(json.dumps({"capacity_rps": summary["capacity_rps"], "complete": not interrupted and not sweep.errors}))
    return 1 if interrupted or sweep.errors else 0


def summarize_sweep(results: dict[str, dict[float, dict]], policies: Sequence[str], rates: Sequence[float],
                    slo: dict | None, threshold: float, config: dict) -> dict:
    points = [point_row(p, r, results[p][r]) for p in policies for r in rates if r in results[p]]
    caps = {p: metrics.capacity([(pt["rate"], pt["attainment"]) for pt in points if pt["policy"] == p],
                                threshold) for p in policies}
    return {
        "capacity_rps": {p: c.value for p, c in caps.items()},
        "capacity": {p: {"value": c.value, "bound": c.bound, "label": c.label()} for p, c in caps.items()},
        "threshold": threshold,
        "policies": list(policies),
        "rates": list(rates),
        "slo": slo or {"ttft_s": None, "tbt_s": None, "source": "not measured"},
        "config": config,
        "points": points,
    }


if __name__ == "__main__":
    sys.exit(main())
