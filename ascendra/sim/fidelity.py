"""python -m ascendra.sim --fidelity: the real CPU server and the simulator on the same workload.

Starts ``python -m ascendra.server --model tiny --num-instances 2 --policy sarathi``, replays one
fixed workload (same seed, same lengths, Poisson arrivals) at three rates through bench.serve's
client, then simulates the same requests with the step-time model the server's workers fitted on
this CPU (their cached profile, or --profile). Prints attainment and mean TTFT / TBT side by side.

Two simulated columns: "sim" uses the profile as is (it times the forward pass only); "sim+ovh"
adds what one unloaded measurement shows the profile misses: a per-step overhead (a lone request's
real mean TBT minus the simulated one: sampling, the worker loop, ZeroMQ) and a dispatch latency
(its real TTFT minus the simulated one: HTTP, routing, streaming back). Nothing is fitted to the
loaded runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.client import ClientConfig
from bench.compare import ServerProcess, free_port, wait_idle
from bench.serve import execute, write_json
from bench.workloads import RequestSpec, WorkloadConfig, build_workload
from ascendra.perf_model import BatchShape
from ascendra.sim import costs
from ascendra.sim.engine import SimConfig
from ascendra.sim.sweep import VARIANTS, Setup, simulate

NUM_INSTANCES = 2
NUM_BLOCKS = 4096
MAX_MODEL_LEN = 2048  # the tiny model's


class PlusOverhead:
    """A step-time source plus a fixed per-step cost."""

    def __init__(self, base, overhead_s: float) -> None:
        self.base, self.overhead_s = base, overhead_s

    def predict(self, shape: BatchShape) -> float:
        t = self.base.predict(shape)
        return t + self.overhead_s if t > 0 else t


def worker_profile(num_instances: int) -> Path | None:
    """The profile the server's workers use: tiny on CPU with cpu_count // N threads each."""
    threads = max(1, (os.cpu_count() or 1) // num_instances)
    found = [p for p in costs.profile_files() if p.name.startswith("tiny-cpu-") and p.stem.endswith(f"-t{threads}")]
    return found[0] if found else None


def fit_profile(num_instances: int, out: Path, random_batches: int = 150) -> Path:
    """Time the tiny model now, in this process, with the threads each worker gets, on the
    profiler's grid plus random prefill / decode / mixed batches like the ones a loaded server
    runs (the grid alone underestimates wide decode batches by 20-40% on this CPU), and fit the
    PerfModel. A cached worker profile may also have been fitted while the machine was busy."""
    import torch

    from ascendra.models import resolve_model
    from ascendra.perf_model import PerfModel, ape_stats
    from workers.model_runner import ModelRunner
    from workers.profiler import grid, random_shapes, time_shapes

    threads = max(1, (os.cpu_count() or 1) // num_instances)
    torch.set_num_threads(threads)
    m = resolve_model("tiny")
    runner = ModelRunner(m.path, m.name, torch.device("cpu"))
    pool = runner.make_pool(NUM_BLOCKS, 16, shareable=False)
    shapes = grid(512, runner.max_model_len) + random_shapes(random_batches, 512, runner.max_model_len, seed=7)
    _log(f"fitting the step-time profile on {len(shapes)} batches ({threads} thread(s))")
    timed = list(time_shapes(runner, pool, 16, shapes, reps=1))
    model = PerfModel().fit([s for s, _ in timed], [t for _, t in timed])
    held = list(time_shapes(runner, pool, 16, random_shapes(30, 512, runner.max_model_len, seed=8), reps=1))
    err = ape_stats([model.predict(s) for s, _ in held], [t for _, t in held])
    path = out / f"profile-tiny-t{threads}.json"
    path.write_text(json.dumps({"coef": model.to_list(), "points": len(timed), **err}) + "\n")
    _log(f"profile held-out error: median {err['median_ape_pct']:.1f}%, p90 {err['p90_ape_pct']:.1f}%")
    return path


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far (Linux /proc)."""
    total, todo, seen = 0.0, [pid], set()
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used so far (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_server(a: argparse.Namespace, n: int, specs_by_rate: dict[float, list[RequestSpec]],
               probe: list[RequestSpec], out: Path, ttft: float, tbt: float) -> tuple[dict, dict[float, dict]]:
    port = free_port()
    cmd = [sys.executable, "-m", "ascendra.server", "--host", "127.0.0.1", "--port", str(port), "--model", "tiny",
           "--num-instances", str(n), "--policy", "sarathi", "--num-blocks", str(NUM_BLOCKS),
           "--ttft-slo", str(ttft), "--tbt-slo", str(tbt)]
    results: dict[float, dict] = {}
    with ServerProcess(cmd, port, out / "server.log") as srv:
        _log(f"starting the server: {' '.join(cmd[1:])}")
        srv.wait_healthy(600)
        base = ClientConfig(base_url=srv.base_url, timeout_s=300, seed=a.seed, send_slo=True, ttft_slo_s=ttft,
                            tbt_slo_s=tbt)
        execute([RequestSpec(-1 - i, 0.0, 16, 4) for i in range(3)], replace(base, max_concurrency=1), progress=False)
        unloaded = execute(probe, replace(base, max_concurrency=1), progress=False)
        for rate, specs in specs_by_rate.items():
            wait_idle(srv.base_url, 120)
            _log(f"server @ {rate:g} req/s: {len(specs)} requests")
            cpu0, own0, all0 = _cpu_seconds(srv.proc.pid), time.process_time(), _machine_busy_seconds()
            t0 = time.perf_counter()
            res = execute(specs, base, progress=False)
            wall = time.perf_counter() - t0
            # Cores busy on average: the simulator gives every instance a whole device; here
            # the workers share the CPU with the coordinator, this client and anything else running.
            server_cores = (_cpu_seconds(srv.proc.pid) - cpu0) / wall
            client_cores = (time.process_time() - own0) / wall
            res["cpu"] = {"server_cores": server_cores, "client_cores": client_cores, "cpu_count": os.cpu_count(),
                          "other_cores": max(0.0, (_machine_busy_seconds() - all0) / wall - server_cores - client_cores)}
            if res["error"]:
                raise RuntimeError(f"server run at {rate:g} req/s failed: {res['error']}")
            results[rate] = res
            write_json(str(out / f"server_rate_{rate:g}.json"), res)
    write_json(str(out / "server_unloaded.json"), unloaded)
    return unloaded, results


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def fidelity_main(a: argparse.Namespace) -> int:
    out = Path(a.out or "results/sim-fidelity")
    n = a.num_instances or NUM_INSTANCES
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in (a.fidelity_rates or "4,8,11").split(",")]
    ttft = a.ttft_slo if a.ttft_slo is not None else 0.5
    tbt = a.tbt_slo if a.tbt_slo is not None else 0.1
    if a.dataset is None:  # prefill-heavy, so model time dominates HTTP streaming on this CPU
        wcfg = WorkloadConfig(dataset="uniform", num_requests=a.num_requests or 120, prompt_len=768,
                              output_len=32, range_ratio=0.5, arrivals="poisson", seed=a.seed)
    else:
        wcfg = WorkloadConfig(dataset=a.dataset, num_requests=a.num_requests or 120, prompt_len=a.prompt_len,
                              output_len=a.output_len, range_ratio=a.range_ratio, arrivals="poisson", seed=a.seed)
    specs_by_rate = {r: build_workload(replace(wcfg, rate=r)) for r in rates}
    mid = specs_by_rate[rates[0]]
    probe = [RequestSpec(10_000 + i, 0.0, round(sum(s.prompt_len for s in mid) / len(mid)),
                         round(sum(s.output_len for s in mid) / len(mid))) for i in range(5)]

    if a.skip_server:
        unloaded = json.loads((out / "server_unloaded.json").read_text())
        server = {r: json.loads((out / f"server_rate_{r:g}.json").read_text()) for r in rates}
    else:
        unloaded, server = run_server(a, n, specs_by_rate, probe, out, ttft, tbt)

    if a.profile in (None, "fit"):
        path = fit_profile(n, out)
    elif a.profile == "cached":
        path = worker_profile(n)
        if path is None:
            raise SystemExit("error: no cached CPU profile for the tiny model; use --profile fit or PATH")
    else:
        path = Path(a.profile).expanduser()
    model = costs.load_profile(path)
    cfg = SimConfig(policy="sarathi", num_instances=n, num_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN,
                    ttft_slo=ttft, tbt_slo=tbt)
    link = costs.MigrationCost(costs.LLAMA3_8B.kv_bytes_per_token)

    # One unloaded measurement sets what the profile does not see: a per-step overhead (from a
    # lone request's mean TBT) and the dispatch latency (from its TTFT, given that overhead).
    spaced = [replace(s, arrival_s=10.0 * i) for i, s in enumerate(probe)]
    real_tbt0 = _mean([r["mean_tbt_s"] for r in unloaded["requests"] if r["mean_tbt_s"] is not None])
    real_ttft0 = _mean([r["ttft_s"] for r in unloaded["requests"] if r["ttft_s"] is not None])
    sim0 = simulate(Setup(cfg, wcfg, model, model, link), VARIANTS["sarathi"], 1.0, specs=spaced)["summary"]
    overhead = max(0.0, (real_tbt0 or 0.0) - (sim0["tbt_mean_mean_s"] or 0.0))
    sim1 = simulate(Setup(cfg, wcfg, PlusOverhead(model, overhead), model, link), VARIANTS["sarathi"], 1.0,
                    specs=spaced)["summary"]
    dispatch = max(0.0, (real_ttft0 or 0.0) - (sim1["ttft_mean_s"] or 0.0))
    cal_cfg = replace(cfg, dispatch_latency_s=dispatch)

    rows = []
    for r in rates:
        specs = specs_by_rate[r]
        raw = simulate(Setup(cfg, wcfg, model, model, link), VARIANTS["sarathi"], r, specs)
        cal = simulate(Setup(cal_cfg, wcfg, PlusOverhead(model, overhead), model, link), VARIANTS["sarathi"], r, specs)
        s = server[r]["summary"]
        sim_cores = sum(i["busy_s"] for i in raw["sim"]["instances"]) / raw["sim"]["simulated_s"]
        rows.append({"rate": r, "real": _pick(s), "sim": _pick(raw["summary"]), "sim_overhead": _pick(cal["summary"]),
                     "cpu": server[r].get("cpu"), "sim_model_cores": sim_cores})

    print(f"Fidelity: tiny model, {n} sarathi instances on this CPU, {wcfg.num_requests} requests per "
          f"rate ({wcfg.dataset} prompt {wcfg.prompt_len} / output {wcfg.output_len}, Poisson), SLOs TTFT {ttft:g}s, "
          f"TBT {tbt:g}s")
    print(f"profile {path} coef {costs.fmt_coef(model)}")
    print(f"unloaded lone request: real TTFT {1e3 * (real_ttft0 or 0):.1f} ms / mean TBT {1e3 * (real_tbt0 or 0):.1f} ms, "
          f"simulated {1e3 * (sim0['ttft_mean_s'] or 0):.1f} / {1e3 * (sim0['tbt_mean_mean_s'] or 0):.1f} ms -> sim+ovh adds "
          f"{1e3 * overhead:.1f} ms per step and {1e3 * dispatch:.1f} ms dispatch latency")
    print()
    print("| rate | attainment real / sim / sim+ovh | mean TTFT (ms) real / sim / sim+ovh | "
          "mean TBT (ms) real / sim / sim+ovh | TTFT err sim / sim+ovh | cores busy: server + client, other processes (sim: model) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        re_, si, so = row["real"], row["sim"], row["sim_overhead"]
        print(f"| {row['rate']:g} | {re_['attainment']:.1%} / {si['attainment']:.1%} / {so['attainment']:.1%} | "
              f"{_ms(re_['ttft_mean_s'])} / {_ms(si['ttft_mean_s'])} / {_ms(so['ttft_mean_s'])} | "
              f"{_ms(re_['tbt_mean_mean_s'])} / {_ms(si['tbt_mean_mean_s'])} / {_ms(so['tbt_mean_mean_s'])} | "
              f"{_err(si['ttft_mean_s'], re_['ttft_mean_s'])} / {_err(so['ttft_mean_s'], re_['ttft_mean_s'])} | "
              f"{_cores(row.get('cpu'))} ({row['sim_model_cores']:.2f}) |")
    busy = [row["rate"] for row in rows if (row.get("cpu") or {}).get("other_cores", 0.0) > 0.2]
    if busy:
        print(f"\nwarning: other processes kept > 0.2 cores busy during the server runs at "
              f"{', '.join(f'{r:g}' for r in busy)} req/s; those real figures are slowed by them")
    report = {"rates": rates, "rows": rows, "profile": str(path), "coef": model.to_list(), "overhead_s": overhead,
              "dispatch_latency_s": dispatch,
              "ttft_slo": ttft, "tbt_slo": tbt, "workload": wcfg.__dict__, "time": time.time()}
    write_json(str(out / "fidelity.json"), report)
    within = {k: [_agrees(row[k], row["real"]) for row in rows] for k in ("sim", "sim_overhead")}
    print(json.dumps({"rates": rates,
                      "attainment": {k: [row[k]["attainment"] for row in rows] for k in ("real", "sim", "sim_overhead")},
                      "ttft_mean_s": {k: [row[k]["ttft_mean_s"] for row in rows] for k in ("real", "sim", "sim_overhead")},
                      "overhead_s": overhead, "dispatch_latency_s": dispatch,
                      "within_10pct": within, "all_within_10pct": {k: all(v) for k, v in within.items()}}))
    return 0


def _agrees(sim: dict, real: dict, tol: float = 0.10) -> bool:
    """Attainment and mean TTFT both within `tol` (relative) of the real server's."""
    def close(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and abs(a - b) <= tol * abs(b)
    return close(sim["attainment"], real["attainment"]) and close(sim["ttft_mean_s"], real["ttft_mean_s"])


def _pick(s: dict) -> dict:
    return {k: s.get(k) for k in ("attainment", "ttft_mean_s", "ttft_p99_s", "tbt_mean_mean_s", "completed")}


def _cores(cpu: dict | None) -> str:
    if not cpu:
        return "n/a"
    others = f", others {cpu['other_cores']:.2f}" if "other_cores" in cpu else ""
    return f"{cpu['server_cores']:.2f} + {cpu['client_cores']:.2f} of {cpu['cpu_count']}{others}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.0f}"


def _err(sim: float | None, real: float | None) -> str:
    if sim is None or not real:
        return "n/a"
    return f"{(sim - real) / real:+.0%}"


