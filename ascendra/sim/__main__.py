"""python -m ascendra.sim: simulate N serving instances under vllm / sarathi / ascendra.

Examples:
    # The paper's setup on simulated A100s (capacities per policy, ratio, ablation, figures)
    python -m ascendra.sim --scenario paper-llama3-8b-a100 --out results/sim-paper
    # One point: 3 instances, ShareGPT-like lengths at 30 req/s
    python -m ascendra.sim --policy sarathi,ascendra --dataset sharegpt --rate 30 --num-requests 2000
    # A capacity sweep with a step-time model fitted on a real device
    python -m ascendra.sim --cost profile:~/.cache/ascendra/profiles/X.json --dataset sharegpt --out results/sim
    python -m ascendra.sim --bench-speed      # 10,000 requests on 3 instances, one core
    python -m ascendra.sim --fidelity         # real CPU server vs simulator, side by side

The last line of stdout is one JSON object (capacities, ratio vs the best baseline, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ascendra.config import add_flags, default, from_args
from ascendra.perf_model import PerfModel
from ascendra.sim import costs
from ascendra.sim.benchlib import (add_slo_args, add_workload_args, format_table, load_trace, markdown, plot,
                                   rate_tag, workload_config, write_json)
from ascendra.sim.bound import disaggregated_bound, throughput_bound, work_bound
from ascendra.sim.engine import SimConfig
from ascendra.sim.scenarios import SCENARIOS, Scenario, WorkloadDef
from ascendra.sim.sweep import VARIANTS, Setup, best_baseline, ratio, search_capacity, simulate, sweep_summary

DEFAULT_VARIANTS = "vllm,sarathi,ascendra"
ABLATIONS = ("ascendra-unstarted", "ascendra-no-decode", "ascendra-no-prefill")
SEAT_VARIANTS = ("sarathi-seats", "sarathi-wide", "ascendra-budget", "ascendra-budget-chunk")
SPLIT_VARIANTS = ("ascendra-hp0", "ascendra-hp2", "ascendra-adaptive")


# The simulator's flags that are server settings too (ascendra.config), bounds checked alike.
SHARED_FLAGS = ["num_instances", "num_hp", "num_blocks", "block_size", "max_num_seqs", "chunk_size", "max_model_len"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ascendra.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("mode")
    m.add_argument("--scenario", choices=sorted(SCENARIOS), default=None, help="a named experiment")
    m.add_argument("--workloads", default=None, metavar="NAME[,NAME...]",
                   help="--scenario: run only these of its workloads")
    m.add_argument("--bench-speed", action="store_true", help="time 10,000 requests on 3 instances")
    m.add_argument("--fidelity", action="store_true",
                   help="real CPU server (tiny model, 2 sarathi instances) vs the simulator at three rates")
    m.add_argument("--out", default=None, help="directory for summary.json, summary.md and plots")
    m.add_argument("--from-points", default=None, metavar="DIR[,DIR...]",
                   help="report from the points earlier --out runs saved instead of simulating (later "
                        "directories win for a policy both have)")
    m.add_argument("--json", default=None, help="single --rate: write every point with per-request rows here")
    s = p.add_argument_group("system")
    s.add_argument("--policy", default=None,
                   help=f"comma-separated: {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}; "
                        "ascendra-unstarted = escalate only before prefill, the paper's code)")
    s.add_argument("--ablation", action="store_true",
                   help="add the escalation ablations: ascendra-unstarted (only before prefill, the paper's code), "
                        "ascendra-no-decode, ascendra-no-prefill (leave out escalating decodes / requests mid-prefill)")
    s.add_argument("--splits", action="store_true",
                   help="add the static splits ascendra-hp0 (no HP) and ascendra-hp2 (two HP), and "
                        "ascendra-adaptive (roles that follow the load)")
    s.add_argument("--seats", action="store_true",
                   help="add the step-budget variants: sarathi-seats (a fixed 4 x max_num_seqs), sarathi-wide (fixed 4 x "
                        "max_num_seqs and 4 x chunk_size) and ascendra-budget (seats and prefill budget sized to "
                        "the deadlines, up to the same caps)")
    # Settings the server has too: flags from ascendra.config (defaults: the scenario's, else as below).
    add_flags(s, ["num_instances", "num_hp"], required_default=True,  # (all in SHARED_FLAGS)
              help={"num_instances": "default 3", "num_hp": "ascendra HP instances (default a third)"})
    s.add_argument("--cost", default=None,
                   help="step-time source: a100 (vidur table + attention model, default), "
                        "profile:PATH (PerfModel JSON {\"coef\": [...]}), coef:[c0,...], "
                        "steplog:PATH (fit on a CPU server's --step-log: steps alone / beside another worker's)")
    s.add_argument("--step-noise", type=int, default=None, metavar="SEED",
                   help="with steplog:PATH: replay how the logged steps strayed from the fit, in their order, "
                        "from a point per instance that SEED picks (the workload's --seed stays apart), "
                        "instead of timing every step by the fit alone")
    s.add_argument("--shared", default=str(costs.DEFAULT_SHARED), help="the shared data directory")
    add_flags(s, ["num_blocks", "block_size", "max_num_seqs", "chunk_size", "max_model_len"], required_default=True,
              help={"num_blocks": "KV blocks per instance (default: a100 memory model; 4096 otherwise)",
                    "block_size": "tokens per KV block (default 16)",
                    "max_num_seqs": f"most requests in one instance's batch (default {default('max_num_seqs')})",
                    "chunk_size": f"token budget per step for chunked prefill (default {default('chunk_size')})",
                    "max_model_len": "longest prompt + output in tokens (default 8192)"})
    s.add_argument("--link", default=None, help=f"KV link: {', '.join(costs.LINKS)} or GB/s (default pcie4)")
    s.add_argument("--link-latency", type=float, default=1e-3, help="fixed seconds per copy")
    s.add_argument("--kv-bytes-per-token", type=int, default=None,
                   help="default: Llama-3-8B bf16 (131072)")
    s.add_argument("--no-scheduler-model", dest="scheduler_model", action="store_false",
                   help="keep the fitted model from the LP/HP schedulers (the real worker gives it to them)")
    s.add_argument("--no-token-times", action="store_true", help="skip per-token times (no ITL/p99 metrics)")
    r = p.add_argument_group("rates")
    r.add_argument("--rate", type=float, default=None, help="one rate (req/s): a single point per policy")
    r.add_argument("--rates", default=None, help="comma-separated rates for a capacity sweep")
    r.add_argument("--start-rate", type=float, default=None, help="adaptive sweep starts here")
    r.add_argument("--refine", type=int, default=4, help="bisection steps around the 90%% crossing")
    r.add_argument("--threshold", type=float, default=0.9)
    r.add_argument("--stop-below", type=float, default=0.5)
    r.add_argument("--jobs", type=int, default=None, help="processes (default: CPU count)")
    add_workload_args(p)
    add_slo_args(p, None, None)
    f = p.add_argument_group("fidelity")
    f.add_argument("--fidelity-rates", default=None,
                   help="comma-separated rates for --fidelity (default 4,7,10: light, busy, and just below the "
                        "rate where this box's two workers saturate, ~11)")
    f.add_argument("--fidelity-passes", type=int, default=2,
                   help="--fidelity: serve each rate this many times (the figures pool them; pass against pass "
                        "shows the real server's own noise)")
    f.add_argument("--profile", default=None,
                   help="--fidelity: the profile behind the 'sim' column: cached (default: the one the "
                        "server's workers fitted or loaded), fit (time the tiny model now, in this process) or a "
                        "profile JSON path")
    f.add_argument("--skip-server", action="store_true", help="--fidelity: reuse saved server results in --out")
    return p


# ------------------------------------------------------------------ setups


def link_bandwidth(spec: str | None) -> float:
    if spec is None:
        return costs.LINKS["pcie4"]
    if spec in costs.LINKS:
        return costs.LINKS[spec]
    return float(spec) * 1e9


def make_setup(a: argparse.Namespace, sc: Scenario | None, wl: WorkloadDef | None) -> Setup:
    shared = Path(a.shared)
    cost_spec = a.cost or (sc.cost if sc else "a100")
    try:
        cost = costs.make_cost(cost_spec, shared, step_noise=a.step_noise is not None)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    # What the system believes: a PerfModel as its profiler would fit it on this "device".
    model = cost if isinstance(cost, PerfModel) else costs.fit_perf_model(cost)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    block_size = pick(a.block_size, sc.block_size if sc else 16)
    kv_bytes = a.kv_bytes_per_token or costs.LLAMA3_8B.kv_bytes_per_token
    if a.num_blocks:
        num_blocks = a.num_blocks
    elif cost_spec == "a100":
        num_blocks = costs.kv_pool_blocks(costs.A100_80GB, costs.LLAMA3_8B, block_size)
    else:
        num_blocks = 4096
    ttft = pick(a.ttft_slo, wl.ttft_slo if wl else default("ttft_slo"))
    tbt = pick(a.tbt_slo, wl.tbt_slo if wl else default("tbt_slo"))
    cfg = SimConfig(
        num_instances=pick(a.num_instances, sc.num_instances if sc else 3),
        num_hp=pick(a.num_hp, sc.num_hp if sc else None),
        num_blocks=num_blocks, block_size=block_size,
        max_num_seqs=pick(a.max_num_seqs, sc.max_num_seqs if sc else default("max_num_seqs")),
        chunk_size=pick(a.chunk_size, sc.chunk_size if sc else default("chunk_size")),
        max_model_len=pick(a.max_model_len, sc.max_model_len if sc else 8192),
        ttft_slo=ttft, tbt_slo=tbt, scheduler_uses_model=a.scheduler_model,
        record_token_times=not a.no_token_times, noise_seed=a.step_noise or 0)
    wcfg = workload_config(a, None)
    if wl is not None:
        wcfg = replace(wcfg, dataset=wl.dataset, arrivals=wl.arrivals, burstiness=wl.burstiness,
                       slo_classes=wl.slo_classes, max_model_len=cfg.max_model_len,
                       num_requests=a.num_requests or (sc.num_requests if sc else None))
    elif wcfg.dataset == "fixed" and a.dataset is None:
        wcfg = replace(wcfg, dataset="sharegpt")
    if wcfg.num_requests is None and wcfg.duration_s is None:
        wcfg = replace(wcfg, num_requests=2000)
    trace = None
    if wcfg.dataset == "trace":
        trace = load_trace(a.trace or shared / "traces" / "azure_llm_2023_conv.csv")
        if wl is None and wcfg.arrivals == "auto":
            wcfg = replace(wcfg, arrivals="poisson")  # rates are swept: Poisson, as the paper's setup
    label = "Llama-3.1-8B on A100-80GB (simulated)" if cost_spec == "a100" else f"simulated ({cost_spec})"
    if a.step_noise is not None:
        label += ", logged step noise replayed"
    link = costs.MigrationCost(kv_bytes, block_size, link_bandwidth(a.link or (sc.link if sc else None)),
                               a.link_latency)
    notes = [f"step time: {'vidur A100 operator table + attention model' if cost_spec == 'a100' else cost_spec}; "
             f"system's fitted model coef {costs.fmt_coef(model)}",
             f"{num_blocks} KV blocks of {block_size} tokens per instance; KV link "
             f"{link.bandwidth_bytes_s / 1e9:g} GB/s + {link.latency_s * 1e3:g} ms",
             f"schedulers {'use' if a.scheduler_model else 'do not use'} the fitted model"]
    return Setup(cfg, wcfg, cost, model, link, trace, label, notes)


def variants_from(a: argparse.Namespace, sc: Scenario | None) -> list[str]:
    names = [v.strip() for v in (a.policy or (",".join(sc.variants) if sc else DEFAULT_VARIANTS)).split(",") if v.strip()]
    if a.ablation:
        names += [v for v in ABLATIONS if v not in names]
    if a.seats:
        names += [v for v in SEAT_VARIANTS if v not in names]
    if a.splits:
        names += [v for v in SPLIT_VARIANTS if v not in names]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"error: unknown policy {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    return names


# ------------------------------------------------------------------ sweeps (one process per task)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _search(task: tuple) -> tuple:
    key, setup, vname, rates, start, a_threshold, a_stop, refine = task
    variant = VARIANTS[vname]

    def point(rate: float) -> dict:
        res = simulate(setup, variant, rate)
        s = res["summary"]
        _log(f"  {key:>10} {vname:>18} @ {rate:8.3g} req/s: attainment {s['attainment']:6.1%}  "
             f"TTFT p99 {s['ttft_p99_s'] or 0:7.3f}s  escalations {sum(res['sim']['escalations'].values()):4d}  "
             f"({res['sim']['wall_s']:.1f}s)")
        return res

    pts = search_capacity(point, rates, a_threshold, a_stop, start, refine)
    return key, vname, pts


def run_tasks(tasks: list[tuple], jobs: int) -> list[tuple]:
    if jobs <= 1 or len(tasks) <= 1:
        return [_search(t) for t in tasks]
    ctx = mp.get_context("fork")
    with ctx.Pool(min(jobs, len(tasks))) as pool:
        return pool.map(_search, tasks, chunksize=1)


SEATS_FACTOR = VARIANTS["ascendra-budget"].deadline_seats


def add_bound(summary: dict, setup: Setup) -> None:
    """The throughput bound (ascendra.sim.bound) for this workload, and each capacity's fraction:
    at the configured seats (vllm, sarathi, ascendra) and at SEATS_FACTOR times them within the KV
    pool (the seat variants, which may hold that many). Also the work bound, which holds for any
    schedule and seat count, and how far above the best baseline it lies: no policy's ratio can
    pass that in a steady state."""
    specs = setup.requests(1.0)
    sim = setup.sim
    b = throughput_bound(setup.cost, specs, sim.tbt_slo, sim.max_num_seqs, sim.num_instances)
    if b is None:
        return
    wide = throughput_bound(setup.cost, specs, sim.tbt_slo, sim.max_num_seqs * SEATS_FACTOR, sim.num_instances,
                            kv_tokens=sim.num_blocks * sim.block_size)
    summary["bound_rps"] = b.rate
    summary["bound_binding"] = b.binding
    summary["bound_wide_rps"] = wide.rate
    summary["bound_wide_binding"] = wide.binding
    summary["bound_work_rps"] = work_bound(setup.cost, specs, sim.num_instances)
    split = disaggregated_bound(setup.cost, specs, sim.tbt_slo, sim.max_num_seqs, sim.num_instances)
    if split is not None:
        summary["bound_disaggregated_rps"], summary["bound_disaggregated_binding"] = split.rate, split.binding
    best = best_baseline(summary["capacity_rps"])
    summary["bound_work_vs_best_baseline"] = summary["bound_work_rps"] / best if best else None
    summary["fraction_of_bound"] = {p: (c / (wide.rate if p in SEAT_VARIANTS else b.rate) if c else None)
                                    for p, c in summary["capacity_rps"].items()}
    caps = summary["capacity_rps"]
    if "ascendra-budget" in caps:
        summary["ratio_seats_vs_best_baseline"] = ratio(caps, "ascendra-budget", ("vllm", "sarathi", "sarathi-seats", "sarathi-wide"))


def write_workload_report(out: Path, name: str, setup: Setup, pts: dict[str, dict[float, dict]],
                          threshold: float, extra: dict) -> dict:
    summary = sweep_summary(pts, setup, threshold, extra | {"workload": name})
    caps = summary["capacity_rps"]
    summary["ratio_vs_best_baseline"] = ratio(caps)
    add_bound(summary, setup)
    if "ascendra-unstarted" in caps:
        summary["ablation"] = {"escalate_any_stage": caps.get("ascendra"),
                               "escalate_before_prefill_only": caps.get("ascendra-unstarted"),
                               "ratio_any_stage_vs_before_prefill":
                                   ratio(caps, "ascendra", ("ascendra-unstarted",))}
    for v in ABLATIONS[1:]:
        if v in caps:
            summary.setdefault("ablation", {})[v] = caps.get(v)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    for p, by_rate in pts.items():
        for r, res in by_rate.items():
            write_json(str(d / "points" / p / f"{rate_tag(r)}.json"), res)
    write_json(str(d / "summary.json"), summary)
    md = f"## {name}\n\n" + markdown(summary) + _extra_markdown(summary)
    (d / "summary.md").write_text(md)
    plot(summary, d / "attainment.png")
    return summary


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def scenario_table(workloads: dict[str, dict]) -> str:
    """Per workload: capacities at the same seats, ratio, bound, fractions; the escalation ablation;
    and the seat variants against their own (wider) bound."""
    g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    x = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    pc = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    has = lambda p: any(p in (w.get("capacity_rps") or {}) for w in workloads.values())  # noqa: E731
    pol = [p for p in ("vllm", "sarathi", "ascendra", "ascendra-admission") if has(p)]
    rows = []
    for name, w in workloads.items():
        caps, frac = w.get("capacity_rps") or {}, w.get("fraction_of_bound") or {}
        rows.append([name] + [g(caps.get(p)) for p in pol] + [x(w.get("ratio_vs_best_baseline")),
                    f"{g(w.get('bound_rps'))} ({w.get('bound_binding', '-')})"] + [pc(frac.get(p)) for p in pol]
                    + [f"{g(w.get('bound_work_rps'))} ({x(w.get('bound_work_vs_best_baseline'))})"])
    out = ("Capacity (req/s at 90% attainment), every policy at the same seats; the work bound holds for any "
           "schedule and seat count (in brackets: it over the best baseline, the highest ratio a steady state "
           "allows):\n\n"
           + _table(["workload"] + pol + ["ascendra / best baseline", "bound (binds)"] + [f"{p} / bound" for p in pol]
                    + ["work bound"], rows))
    abl = [p for p in ABLATIONS if has(p)]
    if abl:
        rows = []
        for name, w in workloads.items():
            caps = w.get("capacity_rps") or {}
            a = caps.get("ascendra")
            rows.append([name, g(a)] + [g(caps.get(p)) for p in abl]
                        + [x(a / caps[p] if a and caps.get(p) else None) for p in abl])
        out += ("\nEscalation ablation (capacity, and ascendra / variant):\n\n"
                + _table(["workload", "ascendra"] + abl + [f"vs {p}" for p in abl], rows))
    split = [p for p in SPLIT_VARIANTS if has(p)]
    if split:
        rows = []
        static = [p for p in ("ascendra", *split) if p != "ascendra-adaptive"]
        for name, w in workloads.items():
            caps = w.get("capacity_rps") or {}
            best = max((c for p in static if (c := caps.get(p))), default=None)
            judged = ["ascendra"] + [p for p in split if p == "ascendra-adaptive"]
            rows.append([name, g(caps.get("ascendra"))] + [g(caps.get(p)) for p in split]
                        + [x(caps[p] / best if caps.get(p) and best else None) for p in judged])
        tail = ["ascendra / best static"] + (["adaptive / best static"] if "ascendra-adaptive" in split else [])
        out += ("\nSplits (ascendra: 2 LP + 1 HP, the HP's ticket open at low load; hp0: 3 LP; hp2: 1 LP + 2 HP; "
                "adaptive: roles follow the load from 2 LP + 1 HP):\n\n"
                + _table(["workload", "ascendra"] + split + tail, rows))
    seat = [p for p in SEAT_VARIANTS if has(p)]
    if seat:
        rows = []
        for name, w in workloads.items():
            caps, frac = w.get("capacity_rps") or {}, w.get("fraction_of_bound") or {}
            rows.append([name] + [g(caps.get(p)) for p in seat] + [x(w.get("ratio_seats_vs_best_baseline")),
                        f"{g(w.get('bound_wide_rps'))} ({w.get('bound_wide_binding', '-')})"]
                        + [pc(frac.get(p)) for p in seat])
        what = {"sarathi-seats": f"sarathi-seats: a fixed {SEATS_FACTOR} x max_num_seqs",
                "sarathi-wide": f"sarathi-wide: fixed {SEATS_FACTOR} x max_num_seqs and {SEATS_FACTOR} x chunk_size",
                "ascendra-budget": "ascendra-budget: seats sized to the deadlines up to the same seat cap",
                "ascendra-budget-chunk": f"ascendra-budget-chunk: and each step's prefill, up to {SEATS_FACTOR} x "
                                         "chunk_size"}
        out += ("\nStep budgets (" + "; ".join(what[p] for p in seat) + "):\n\n"
                + _table(["workload"] + seat + ["ascendra-budget / best fixed-cap baseline",
                                               f"bound at {SEATS_FACTOR}x seats (binds)"]
                         + [f"{p} / bound" for p in seat], rows))
    return out


def _extra_markdown(summary: dict) -> str:
    lines = [""]
    if summary.get("bound_rps") is not None:
        lines.append(f"Throughput bound: {summary['bound_rps']:.3g} req/s ({summary['bound_binding']} binds; "
                     "model in ascendra/sim/bound.py)")
    if summary.get("bound_work_rps") is not None:
        over = summary.get("bound_work_vs_best_baseline")
        lines.append(f"Work bound (any schedule, any seats): {summary['bound_work_rps']:.3g} req/s"
                     + (f", {over:.2f}x the best baseline" if over else ""))
    if summary.get("bound_disaggregated_rps") is not None:
        lines.append(f"Split into prefill-only and decode-only instances, at best: "
                     f"{summary['bound_disaggregated_rps']:.3g} req/s ({summary['bound_disaggregated_binding']} binds)")
    if summary.get("ratio_vs_best_baseline") is not None:
        lines.append(f"Ascendra capacity / best baseline: {summary['ratio_vs_best_baseline']:.2f}x")
    if summary.get("ratio_seats_vs_best_baseline") is not None:
        lines.append(f"Seat variants: bound {summary['bound_wide_rps']:.3g} req/s ({summary['bound_wide_binding']}); "
                     f"ascendra-budget / best of vllm, sarathi, sarathi-seats, sarathi-wide: "
                     f"{summary['ratio_seats_vs_best_baseline']:.2f}x")
    ab = summary.get("ablation")
    if ab:
        g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
        lines.append(f"Ablation: escalation at every stage {g(ab.get('escalate_any_stage'))} req/s vs only before "
                     f"prefill {g(ab.get('escalate_before_prefill_only'))} req/s; without escalating decodes "
                     f"{g(ab.get('ascendra-no-decode'))}, without mid-prefill {g(ab.get('ascendra-no-prefill'))}")
    rows = [pt for pt in summary["points"] if pt["policy"].startswith("ascendra")]
    if rows:
        lines += ["", "| policy | rate | escalations | moved unstarted | moved with KV | failed | frozen (s) |",
                  "|---|---|---|---|---|---|---|"]
        for pt in rows:
            mg = pt["migrations"]
            lines.append(f"| {pt['policy']} | {pt['rate']:g} | {sum(pt['escalations'].values())} | "
                         f"{mg['moved_waiting']} | {mg['moved_kv']} | {mg['failed'] + mg['filtered'] + mg.get('late', 0)} | "
                         f"{mg['frozen_s']:.3f} |")
    lines += [""] + [f"- {n}" for n in summary.get("notes", [])]
    return "\n".join(lines) + "\n"


def load_points(dirs: list[Path], workloads: list[str], names: list[str]) -> list[tuple]:
    """The points earlier runs wrote under DIR/<workload>/points/<policy>/ (--out), as run_tasks
    returns them: the policies asked for, each from the last directory that has it."""
    found: dict[tuple[str, str], dict[float, dict]] = {}
    for d in dirs:
        for key in workloads:
            for v in names:
                files = sorted((d / key / "points" / v).glob("*.json"))
                if files:
                    found[(key, v)] = {float(res["rate"]): res for res in (json.loads(f.read_text()) for f in files)}
    missing = [f"{k}/{v}" for k in workloads for v in names if (k, v) not in found]
    if missing:
        raise SystemExit(f"error: --from-points has no points for {', '.join(missing)}")
    return [(k, v, found[(k, v)]) for k in workloads for v in names]


# The curves of the scenario's overview figure (every variant is in each workload's own figure).
OVERVIEW_POLICIES = ("vllm", "sarathi", "ascendra", "sarathi-seats", "ascendra-budget")


def overview_plot(summaries: dict[str, dict], path: Path) -> None:
    """Attainment against rate, one panel per workload, the main policies only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summaries)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, sm) in zip(axes.flat, summaries.items()):
        for p in OVERVIEW_POLICIES:
            pts = sorted((pt["rate"], pt["attainment"]) for pt in sm["points"]
                         if pt["policy"] == p and math.isfinite(pt["rate"]))
            if pts:
                ax.plot([r for r, _ in pts], [100 * v for _, v in pts], marker=".", lw=1, label=p)
        ax.axhline(100 * sm["threshold"], color="grey", ls="--", lw=0.8)
        if sm.get("bound_rps"):
            ax.axvline(sm["bound_rps"], color="black", ls=":", lw=0.8)
        slo = sm["slo"]
        ax.set_title(f"{name} (TTFT {slo['ttft_s']:g}s, TBT {slo['tbt_s']:g}s)", fontsize=8)
        ax.set_ylim(0, 102)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("request rate (req/s); dotted: the bound at the same seats", fontsize=8)
    fig.supylabel("SLO attainment (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sweep_main(a: argparse.Namespace, sc: Scenario | None) -> int:
    out = Path(a.out) if a.out else None
    workloads = list(sc.workloads) if sc else [None]
    if sc and a.workloads:
        wanted = [w.strip() for w in a.workloads.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {w.name for w in sc.workloads})
        if unknown:
            raise SystemExit(f"--workloads: {', '.join(unknown)} not in {sc.name} "
                             f"({', '.join(w.name for w in sc.workloads)})")
        workloads = [w for w in workloads if w.name in wanted]
    names = variants_from(a, sc)
    rates = sorted(float(r) for r in a.rates.split(",")) if a.rates else None
    setups: dict[str, Setup] = {}
    tasks = []
    for wl in workloads:
        key = wl.name if wl else (a.dataset or "sharegpt")
        setup = make_setup(a, sc, wl)
        setups[key] = setup
        start = a.start_rate or (wl.start_rate if wl else 4.0)
        for v in names:
            tasks.append((key, setup, v, rates, start, a.threshold, a.stop_below, a.refine))
    t0 = time.perf_counter()
    if a.from_points:
        results = load_points([Path(d) for d in a.from_points.split(",")], list(setups), names)
    else:
        _log(f"simulating {len(tasks)} capacity searches on {a.jobs or os.cpu_count()} processes")
        results = run_tasks(tasks, a.jobs or os.cpu_count() or 1)
    pts: dict[str, dict[str, dict[float, dict]]] = {k: {} for k in setups}
    for key, vname, p in results:
        pts[key][vname] = p
    report: dict = {"scenario": sc.name if sc else None, "workloads": {}}
    summaries: dict[str, dict] = {}
    md = [f"# {sc.description if sc else 'Simulated capacity'}", ""]
    for key, setup in setups.items():
        if out is not None:
            summary = write_workload_report(out, key, setup, pts[key], a.threshold,
                                            {"scenario": sc.name if sc else None})
        else:
            summary = sweep_summary(pts[key], setup, a.threshold, {})
            summary["ratio_vs_best_baseline"] = ratio(summary["capacity_rps"])
            add_bound(summary, setup)
        summaries[key] = summary
        md.append(f"## {key}\n\n" + markdown(summary) + _extra_markdown(summary))
        report["workloads"][key] = {k: summary.get(k) for k in ("capacity_rps", "capacity", "ratio_vs_best_baseline",
                                                                "ablation", "slo", "bound_rps", "bound_binding",
                                                                "bound_wide_rps", "bound_wide_binding",
                                                                "ratio_seats_vs_best_baseline", "fraction_of_bound",
                                                                "bound_work_rps", "bound_work_vs_best_baseline",
                                                                "bound_disaggregated_rps")}
    md += ["## All workloads", "", scenario_table(report["workloads"])]
    first = report["workloads"][next(iter(setups))]
    report["capacity_rps"] = first["capacity_rps"]
    report["ratio_vs_best_baseline"] = first["ratio_vs_best_baseline"]
    if first.get("ablation"):
        report["ablation"] = first["ablation"]
    report["wall_s"] = time.perf_counter() - t0
    text = "\n".join(md)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(str(out / "summary.json"), report)
        (out / "summary.md").write_text(text)
        if len(summaries) > 1:
            overview_plot(summaries, out / "attainment.png")
        _log(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {', '.join(str(out / k / 'attainment.png') for k in setups)}")
    last = {"capacity_rps": report["capacity_rps"], "ratio_vs_best_baseline": report["ratio_vs_best_baseline"]}
    if len(setups) > 1:
        last["workloads"] = {k: {"capacity_rps": v["capacity_rps"], "ratio_vs_best_baseline": v["ratio_vs_best_baseline"],
                                 "bound_rps": v.get("bound_rps"), "fraction_of_bound": v.get("fraction_of_bound"),
                                 "ratio_seats_vs_best_baseline": v.get("ratio_seats_vs_best_baseline")}
                             for k, v in report["workloads"].items()}
    if report.get("ablation"):
        last["ablation"] = {k: {"ascendra": v["capacity_rps"].get("ascendra"),
                                **{a: v["capacity_rps"].get(a) for a in ABLATIONS if a in v["capacity_rps"]}}
                            for k, v in report["workloads"].items() if v.get("ablation")}
    print(json.dumps(last))
    return 0


def point_main(a: argparse.Namespace) -> int:
    """One rate, each policy: the bench.serve table per policy and a JSON headline."""
    setup = make_setup(a, None, None)
    heads = {}
    full = {}
    specs = setup.requests(a.rate)
    for v in variants_from(a, None):
        res = simulate(setup, VARIANTS[v], a.rate, specs, with_requests=bool(a.json))
        res["server"] = {"prompt_mode": "simulated", "ignore_eos": True, "token_counts_from": "simulator"}
        print(f"{v} @ {a.rate:g} req/s, {len(specs)} requests (simulated in {res['sim']['wall_s']:.2f}s)")
        print(format_table(res))
        s = res["summary"]
        heads[v] = {"attainment": s["attainment"], "goodput_rps": s["goodput_rps"], "ttft_p50_s": s["ttft_p50_s"],
                    "ttft_p99_s": s["ttft_p99_s"], "tbt_mean_p99_s": s["tbt_mean_p99_s"],
                    "escalations": res["sim"]["escalations"], "migrations": res["sim"]["migrations"]}
        if a.json:
            full[v] = res
    if a.json:
        write_json(a.json, {"rate": a.rate, "points": full, "notes": setup.notes})
    print(json.dumps({"rate": a.rate, "policies": heads}))
    return 0


def bench_speed(a: argparse.Namespace) -> int:
    """10,000 ShareGPT-like requests on 3 simulated A100 instances, per policy, in this process."""
    n = a.num_requests or 10_000
    a.num_requests = n
    setup = make_setup(a, None, None)
    rate = a.rate or 40.0
    specs = setup.requests(rate)
    times, last = {}, {}
    for v in variants_from(a, None):
        t = time.perf_counter()
        res = simulate(setup, VARIANTS[v], rate, specs)
        times[v] = round(time.perf_counter() - t, 2)
        last[v] = res["summary"]["attainment"]
        print(f"{v:>18}: {n} requests at {rate:g} req/s on {setup.sim.num_instances} instances: "
              f"{times[v]:.2f}s wall ({res['sim']['wall_s']:.2f}s simulating, rest scoring), "
              f"{res['sim']['events']} events, {res['sim']['simulated_s']:.0f}s simulated, "
              f"attainment {last[v]:.1%}")
    print(json.dumps({"requests": n, "rate": rate, "wall_s": times, "attainment": last,
                      "within_10s": all(t <= 10 for t in times.values())}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from_args(a, parser, SHARED_FLAGS)  # the shared settings' bounds (e.g. --chunk-size >= 1), naming the flag
    if a.fidelity:
        from ascendra.sim.fidelity import fidelity_main
        return fidelity_main(a)
    if a.bench_speed:
        return bench_speed(a)
    sc = SCENARIOS[a.scenario] if a.scenario else None
    if a.rate is not None and sc is None and not a.rates:
        return point_main(a)
    return sweep_main(a, sc)


if __name__ == "__main__":
    sys.exit(main())
