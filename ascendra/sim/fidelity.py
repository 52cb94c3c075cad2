"""python -m ascendra.sim --fidelity: the real CPU server and the simulator on the same workload.

Starts ``python -m ascendra.server --model tiny --num-instances 2 --policy sarathi --step-log``,
replays one fixed workload (same seed, same lengths, Poisson arrivals) at three rates through
bench.serve's client, twice over (--fidelity-passes; the real figures pool the passes, and pass
against pass shows how well the real server agrees with itself), then simulates the same requests.
Prints attainment and mean TTFT / TBT side by side, and whether each agrees within 10%.

Three simulated columns:
- "sim": steps timed with the profile the server's workers fitted on this CPU (their cached
  one, or --profile): the forward pass, timed in the worker with nothing else running.
- "+steps": steps timed with a ``costs.SharedHostCost`` fitted on the steps the server logged
  while it served calibration workloads (the same kind of requests from other seeds, at the
  lowest and the highest rate, after a warm-up) before the measured runs. On this CPU a step runs
  15-20% slower beside the other worker's than alone (two single-thread workers share caches,
  memory bandwidth and the cores the coordinator and the client need), and wide decode batches
  cost more than the profile's grid says. Requests also get the dispatch latency a lone request
  shows (its real TTFT minus the simulated one: HTTP, tokenizing, routing, streaming back).
- "x speed": the same, rescaled by how fast the measured runs' logged steps ran against the fit:
  this box's speed drifts by several percent between minutes (other tenants).
Only "x speed" reads anything from the measured runs, and only their steps' durations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from ascendra.sim import costs
from ascendra.sim.benchlib import (ClientConfig, RequestSpec, ServerProcess, WorkloadConfig, build_workload,
                                   execute, free_port, http_get, promtext, wait_idle, write_json)
from ascendra.sim.engine import SimConfig
from ascendra.sim.sweep import VARIANTS, Setup, simulate

NUM_INSTANCES = 2
NUM_BLOCKS = 4096
MAX_MODEL_LEN = 2048  # the tiny model's


def worker_profile(num_instances: int) -> Path | None:
    """The profile the server's workers use: tiny on CPU with their threads each (packed weights)."""
    from ascendra.coordinator import cpu_worker_threads
    from workers.profiler import profile_suffix

    threads = cpu_worker_threads(os.cpu_count() or 1, num_instances)
    packed, plain = profile_suffix(threads, True), profile_suffix(threads, False)
    found = [p for p in costs.profile_files() if p.name.startswith("tiny-cpu-") and p.stem.endswith((packed, plain))]
    found.sort(key=lambda p: not p.stem.endswith(packed))
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


def _server_metrics(base_url: str) -> dict[str, float]:
    """The coordinator's /metrics, summed over labels ({} when it does not answer)."""
    status, text = http_get(base_url + "/metrics", 5.0)
    return promtext.parse(text) if status == 200 else {}


def _metric(m: dict[str, float], suffix: str) -> float:
    return next((v for k, v in m.items() if k.endswith(suffix)), 0.0)


def _measured(srv, base: ClientConfig, specs: list[RequestSpec]) -> dict:
    """Run specs and note the CPU each part used meanwhile: the coordinator, its workers, this
    client (the load generator) and anything else on the machine."""
    server0, metrics0 = _cpu_seconds(srv.proc.pid), _server_metrics(srv.base_url)
    own0, all0 = time.process_time(), _machine_busy_seconds()
    t0, m0 = time.perf_counter(), time.monotonic()
    res = execute(specs, base, progress=False)
    wall = time.perf_counter() - t0
    res["monotonic_window"] = [m0, time.monotonic()]  # the step log's clock
    server = _cpu_seconds(srv.proc.pid) - server0
    metrics = promtext.delta(metrics0, _server_metrics(srv.base_url))
    coord = _metric(metrics, "process_cpu_seconds_total")
    client = time.process_time() - own0
    tokens = res["summary"].get("total_output_tokens") or 0
    # Cores busy on average: the simulator gives every instance a whole device; here the workers
    # share the CPU with the coordinator, this client and anything else running.
    res["cpu"] = {"server_cores": server / wall, "coordinator_cores": coord / wall, "client_cores": client / wall,
                  "cpu_count": os.cpu_count(),
                  "other_cores": max(0.0, (_machine_busy_seconds() - all0 - server - client) / wall),
                  "host_cpu_per_token_s": (coord + client) / tokens if tokens else 0.0}
    # The coordinator's own view (from arrival at the server to its receiving the first token),
    # against the client's (which adds HTTP and streaming both ways).
    n_ttft = _metric(metrics, "time_to_first_token_seconds_count")
    res["server_side"] = {"ttft_mean_s": _metric(metrics, "time_to_first_token_seconds_sum") / n_ttft if n_ttft else None}
    return res


def run_server(a: argparse.Namespace, n: int, specs_by_rate: dict[float, list[RequestSpec]],
               calibration: list[list[RequestSpec]], probe: list[RequestSpec], out: Path, ttft: float,
               tbt: float, passes: int) -> tuple[dict, list[list[float]], dict[float, list[dict]]]:
    """Serve, in order: the lone-request probe, the calibration workloads (their steps fit the
    simulator's step times), then the measured rates, `passes` times over. Returns the probe's
    result, the calibration runs' windows on the step log's clock and each rate's results."""
    port = free_port()
    steps = out / "steps.jsonl"
    steps.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ascendra.server", "--host", "127.0.0.1", "--port", str(port), "--model", "tiny",
           "--num-instances", str(n), "--policy", "sarathi", "--num-blocks", str(NUM_BLOCKS),
           "--ttft-slo", str(ttft), "--tbt-slo", str(tbt), "--step-log", str(steps)]
    results: dict[float, list[dict]] = {r: [] for r in specs_by_rate}
    with ServerProcess(cmd, port, out / "server.log") as srv:
        _log(f"starting the server: {' '.join(cmd[1:])}")
        srv.wait_healthy(600)
        base = ClientConfig(base_url=srv.base_url, timeout_s=300, seed=a.seed, send_slo=True, ttft_slo_s=ttft,
                            tbt_slo_s=tbt)
        # Warm up with the probe's own prompt size: the first long prompts are slow (allocation).
        execute(probe, replace(base, max_concurrency=1), progress=False)
        unloaded = _measured(srv, replace(base, max_concurrency=1), probe)
        # And with the heaviest calibration load, unmeasured: the first wide batches run slow
        # (allocator, caches), which would bias the fit.
        wait_idle(srv.base_url, 120)
        _log("warming up under load")
        execute(calibration[-1], base, progress=False)
        windows = []
        for i, specs in enumerate(calibration):
            wait_idle(srv.base_url, 120)
            _log(f"calibration run {i + 1} of {len(calibration)}: {len(specs)} requests")
            windows.append(_measured(srv, base, specs)["monotonic_window"])
        for k in range(passes):
            for rate, specs in specs_by_rate.items():
                wait_idle(srv.base_url, 120)
                _log(f"server @ {rate:g} req/s, pass {k + 1} of {passes}: {len(specs)} requests")
                res = _measured(srv, base, specs)
                if res["error"]:
                    raise RuntimeError(f"server run at {rate:g} req/s failed: {res['error']}")
                results[rate].append(res)
                write_json(str(out / f"server_rate_{rate:g}_pass{k + 1}.json"), res)
    write_json(str(out / "server_unloaded.json"), {**unloaded, "calibration_windows": windows})
    return unloaded, windows, results


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fidelity_main(a: argparse.Namespace) -> int:
    out = Path(a.out or "results/sim-fidelity")
    n = a.num_instances or NUM_INSTANCES
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in (a.fidelity_rates or "4,7,10").split(",")]
    # Tight enough that attainment falls below 100% across the default rates (~2.5x the unloaded
    # TTFT), so that it is compared rather than 100% against 100%. The TBT objective (~7x the
    # unloaded TBT) is kept off the top rate's mean TBT (~20-30 ms): sitting there, a 10% TBT
    # error would flip half the requests.
    ttft = a.ttft_slo if a.ttft_slo is not None else 0.2
    tbt = a.tbt_slo if a.tbt_slo is not None else 0.05
    if a.dataset is None:  # prefill-heavy, so model time dominates HTTP streaming on this CPU
        wcfg = WorkloadConfig(dataset="uniform", num_requests=a.num_requests or 120, prompt_len=768,
                              output_len=32, range_ratio=0.5, arrivals="poisson", seed=a.seed)
    else:
        wcfg = WorkloadConfig(dataset=a.dataset, num_requests=a.num_requests or 120, prompt_len=a.prompt_len,
                              output_len=a.output_len, range_ratio=a.range_ratio, arrivals="poisson", seed=a.seed)
    specs_by_rate = {r: build_workload(replace(wcfg, rate=r)) for r in rates}
    # Calibration: the same kind of load from another seed, at the lowest and the highest rate,
    # so that the step log holds steps that ran alone and beside the other worker's.
    calibration = [build_workload(replace(wcfg, rate=r, seed=wcfg.seed + 1000 + i,
                                          num_requests=max(20, wcfg.num_requests // 2)))
                   for i, r in enumerate(sorted({rates[0], rates[-1]}))]
    mid = specs_by_rate[rates[0]]
    probe = [RequestSpec(10_000 + i, 0.0, round(sum(s.prompt_len for s in mid) / len(mid)),
                         round(sum(s.output_len for s in mid) / len(mid))) for i in range(10)]

    if a.skip_server:
        unloaded = json.loads((out / "server_unloaded.json").read_text())
        windows = unloaded["calibration_windows"]
        server = {r: [json.loads(p.read_text()) for p in sorted(out.glob(f"server_rate_{r:g}_pass*.json"))]
                  for r in rates}
    else:
        unloaded, windows, server = run_server(a, n, specs_by_rate, calibration, probe, out, ttft, tbt,
                                               a.fidelity_passes)

    if a.profile == "fit":
        path = fit_profile(n, out)
    elif a.profile in (None, "cached"):
        path = worker_profile(n)  # the one the server's workers fitted (or loaded) at startup
        if path is None:
            raise SystemExit("error: no cached CPU profile for the tiny model; use --profile fit or PATH")
    else:
        path = Path(a.profile).expanduser()
    model = costs.load_profile(path)
    cfg = SimConfig(policy="sarathi", num_instances=n, num_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN,
                    ttft_slo=ttft, tbt_slo=tbt)
    link = costs.MigrationCost(costs.LLAMA3_8B.kv_bytes_per_token)

    # "sim+steps" times steps with a SharedHostCost fitted on the calibration runs' logged steps
    # (alone / beside the other worker's, plus the worker loop), and gives requests the dispatch
    # latency a lone request shows (its real TTFT minus the simulated one: HTTP, tokenizing,
    # routing, streaming back). The measured runs' own steps and latencies are not used.
    steps = costs.read_step_log(out / "steps.jsonl")
    host = costs.SharedHostCost.fit([s for s in steps if any(w0 <= s["end"] <= w1 for w0, w1 in windows)])
    spaced = [replace(s, arrival_s=10.0 * i) for i, s in enumerate(probe)]
    # Medians: one slow probe request (a hiccup on this shared box) must not shift every simulated TTFT.
    real_tbt0 = _median([r["mean_tbt_s"] for r in unloaded["requests"] if r["mean_tbt_s"] is not None])
    real_ttft0 = _median([r["ttft_s"] for r in unloaded["requests"] if r["ttft_s"] is not None])
    sim0 = simulate(Setup(cfg, wcfg, model, model, link), VARIANTS["sarathi"], 1.0, specs=spaced)["summary"]
    sim1 = simulate(Setup(cfg, wcfg, host, model, link), VARIANTS["sarathi"], 1.0, specs=spaced)["summary"]
    dispatch = max(0.0, (real_ttft0 or 0.0) - (sim1["ttft_mean_s"] or 0.0))
    cal_cfg = replace(cfg, dispatch_latency_s=dispatch)

    steps_by_rate = {r: [s for s in steps if any(run["monotonic_window"][0] <= s["end"] <= run["monotonic_window"][1]
                                                 for run in server[r])] for r in rates}
    rows = []
    for r in rates:
        specs = specs_by_rate[r]
        # This box's speed drifts by 10-20% from one minute to the next (other tenants): the last
        # column rescales the calibration fit by how fast the logged steps ran during these runs.
        speed = host.speed_ratio(steps_by_rate[r]) if steps_by_rate[r] else 1.0
        raw = simulate(Setup(cfg, wcfg, model, model, link), VARIANTS["sarathi"], r, specs)
        cal = simulate(Setup(cal_cfg, wcfg, host, model, link), VARIANTS["sarathi"], r, specs)
        drift = simulate(Setup(cal_cfg, wcfg, host.scaled(speed), model, link), VARIANTS["sarathi"], r, specs)
        sim_cores = sum(i["busy_s"] for i in raw["sim"]["instances"]) / raw["sim"]["simulated_s"]
        rows.append({"rate": r, "real": _pooled(server[r], ttft, tbt), "sim": _pick(raw["summary"]),
                     "sim_steps": _pick(cal["summary"]), "sim_steps_speed": _pick(drift["summary"]), "speed": speed,
                     "passes": [_pooled([run], ttft, tbt) for run in server[r]],
                     "cpu": server[r][0].get("cpu"), "sim_model_cores": sim_cores})

    passes = len(server[rates[0]])
    print(f"Fidelity: tiny model, {n} sarathi instances on this CPU, {wcfg.num_requests} requests per "
          f"rate x {passes} pass(es) ({wcfg.dataset} prompt {wcfg.prompt_len} / output {wcfg.output_len}, Poisson), SLOs TTFT {ttft:g}s, "
          f"TBT {tbt:g}s")
    print(f"sim: the workers' profile {path} coef {costs.fmt_coef(model)}")
    print(f"sim+steps: fitted on the calibration runs' {host.num_alone} steps that ran alone "
          f"{costs.fmt_coef(host.alone)} and {host.num_beside} beside the other worker's {costs.fmt_coef(host.beside)}, "
          f"+{1e3 * host.loop_s:.2f} ms worker loop per step, {1e3 * dispatch:.1f} ms dispatch latency")
    print("sim+steps x speed: the same, x how slowly this run's logged steps ran against it")
    print(f"unloaded lone request (median of {len(probe)}): real TTFT {_ms(real_ttft0)} ms / mean TBT {_ms(real_tbt0, 1)} ms; sim "
          f"{_ms(sim0['ttft_mean_s'])} / {_ms(sim0['tbt_mean_mean_s'], 1)}; sim+steps {_ms(sim1['ttft_mean_s'])} / "
          f"{_ms(sim1['tbt_mean_mean_s'], 1)} before its dispatch latency")
    print()
    cols = ("real", "sim", "sim_steps", "sim_steps_speed")
    print("| rate | attainment real / sim / +steps / x speed | mean TTFT (ms) real / sim / +steps / x speed | "
          "TTFT error sim / +steps / x speed | mean TBT (ms) real / sim / +steps / x speed | real passes: "
          "attainment, TTFT (ms) | speed | cores busy |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        re_ = row["real"]
        passes = f"{', '.join(_pct(p['attainment']) for p in row['passes'])}; {', '.join(_ms(p['ttft_mean_s']) for p in row['passes'])}"
        print(f"| {row['rate']:g} | {' / '.join(_pct(row[c]['attainment']) for c in cols)} | "
              f"{' / '.join(_ms(row[c]['ttft_mean_s']) for c in cols)} | "
              f"{' / '.join(_err(row[c]['ttft_mean_s'], re_['ttft_mean_s']) for c in cols[1:])} | "
              f"{' / '.join(_ms(row[c]['tbt_mean_mean_s']) for c in cols)} | {passes} | {row['speed']:.3f} | "
              f"{_cores(row.get('cpu'))}, sim {row['sim_model_cores']:.2f} |")
    busy = [row["rate"] for row in rows if (row.get("cpu") or {}).get("other_cores", 0.0) > 0.2]
    if busy:
        print(f"\nwarning: other processes kept > 0.2 cores busy during the server runs at "
              f"{', '.join(f'{r:g}' for r in busy)} req/s; those real figures are slowed by them")
    report = {"rates": rates, "rows": rows, "profile": str(path), "coef": model.to_list(),
              "step_log_fit": {"alone": host.alone.to_list(), "beside": host.beside.to_list(), "loop_s": host.loop_s,
                               "steps_alone": host.num_alone, "steps_beside": host.num_beside},
              "dispatch_latency_s": dispatch,
              "ttft_slo": ttft, "tbt_slo": tbt, "workload": wcfg.__dict__, "time": time.time()}
    write_json(str(out / "fidelity.json"), report)
    within = {k: [_agrees(row[k], row["real"]) for row in rows] for k in cols[1:]}
    # The noise floor: does the real server agree with itself from one pass to the next?
    within["real_pass_vs_pass"] = [all(_agrees(p, row["passes"][0]) for p in row["passes"][1:]) for row in rows]
    print(json.dumps({"rates": rates,
                      "attainment": {k: [row[k]["attainment"] for row in rows] for k in cols},
                      "ttft_mean_s": {k: [round(row[k]["ttft_mean_s"], 4) for row in rows] for k in cols},
                      "speed": [round(row["speed"], 3) for row in rows], "dispatch_latency_s": round(dispatch, 5),
                      "within_10pct": within, "all_within_10pct": {k: all(v) for k, v in within.items()}}))
    return 0


def _agrees(sim: dict, real: dict, tol: float = 0.10) -> bool:
    """Attainment and mean TTFT both within `tol` (relative) of the real server's."""
    def close(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and abs(a - b) <= tol * abs(b)
    return close(sim["attainment"], real["attainment"]) and close(sim["ttft_mean_s"], real["ttft_mean_s"])


def _pooled(runs: list[dict], ttft: float, tbt: float) -> dict:
    """The real figures over every pass's requests (each pass replays the same workload)."""
    rows = [q for run in runs for q in run["requests"]]
    return {"attainment": _attainment(rows, ttft, tbt),
            "ttft_mean_s": _mean([q["ttft_s"] for q in rows if q["success"] and q["ttft_s"] is not None]),
            "tbt_mean_mean_s": _mean([q["mean_tbt_s"] for q in rows if q["success"] and q["mean_tbt_s"] is not None]),
            "completed": sum(1 for q in rows if q["success"])}


def _attainment(rows: list[dict], ttft: float, tbt: float) -> float:
    """bench.metrics.attainment over saved request rows (so --skip-server can change the SLOs)."""
    ok = sum(1 for q in rows if q["success"] and q["ttft_s"] is not None and q["ttft_s"] <= ttft
             and (q["mean_tbt_s"] is None or q["mean_tbt_s"] <= tbt))
    return ok / len(rows) if rows else 0.0


def _pick(s: dict) -> dict:
    return {k: s.get(k) for k in ("attainment", "ttft_mean_s", "ttft_p99_s", "tbt_mean_mean_s", "completed")}


def _cores(cpu: dict | None) -> str:
    if not cpu:
        return "n/a"
    coord = f" (coordinator {cpu['coordinator_cores']:.2f})" if "coordinator_cores" in cpu else ""
    others = f", others {cpu['other_cores']:.2f}" if "other_cores" in cpu else ""
    return f"server {cpu['server_cores']:.2f}{coord} + client {cpu['client_cores']:.2f} of {cpu['cpu_count']}{others}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _ms(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v * 1e3:.{digits}f}"


def _err(sim: float | None, real: float | None) -> str:
    if sim is None or not real:
        return "n/a"
    return f"{(sim - real) / real:+.0%}"


