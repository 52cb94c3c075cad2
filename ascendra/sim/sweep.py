"""Simulated points and capacity sweeps, scored and reported exactly like bench.compare.

A point = one workload at one rate through one policy. Results become bench.metrics
``RequestResult`` rows (send time = arrival, one chunk per token), so attainment, percentiles and
capacity come from the same code as real runs, and summary.json / summary.md / the plot come from
bench.compare's writers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from ascendra.perf_model import PerfModel
from ascendra.sim.benchlib import (RequestSpec, TraceRow, WorkloadConfig, build_workload, metrics, request_dict,
                                   summarize_sweep)
from ascendra.sim.costs import MigrationCost
from ascendra.sim.engine import SimConfig, SimResult, Simulator


@dataclass
class Variant:
    """A named policy setting: what a curve in the figures is."""

    name: str
    policy: str
    escalate_started: bool = True
    escalate_stages: tuple[str, ...] = ("waiting", "prefill", "decode")
    admission: bool = False  # refuse at arrival what is predicted to miss (429), counted as misses
    # Fixed caps: max_num_seqs and chunk_size times these ...
    seats_factor: int = 1
    chunk_factor: int = 1
    # ... or, ascendra, seats and each step's prefill budget sized to the deadlines held, up to
    # max_num_seqs and chunk_size times these (scheduler.seat_limit and the latency budget).
    deadline_seats: int = 1
    deadline_chunk: int = 1
    num_hp: int | None = None  # ascendra: a static split other than the setup's
    adaptive_roles: bool = False  # ascendra: the HP count follows the at-risk load
    class_routing: bool = True  # ascendra: the tight SLO class to the HP, the looser kept off it


VARIANTS = {
    "vllm": Variant("vllm", "vllm"),
    "sarathi": Variant("sarathi", "sarathi"),
    "ascendra": Variant("ascendra", "ascendra"),
    # The paper's released code: escalate only requests that were never scheduled.
    "ascendra-unstarted": Variant("ascendra-unstarted", "ascendra", escalate_started=False),
    # Per-stage ablation: leave out escalations of decoding requests, or of those mid-prefill.
    "ascendra-no-decode": Variant("ascendra-no-decode", "ascendra", escalate_stages=("waiting", "prefill")),
    "ascendra-no-prefill": Variant("ascendra-no-prefill", "ascendra", escalate_stages=("waiting", "decode")),
    # SLO-aware admission control (--admission on the server): 429 for the predicted misses.
    "ascendra-admission": Variant("ascendra-admission", "ascendra", admission=True),
    # Step budgets sized to deadlines: seats (scheduler.seat_limit) up to 4 x max_num_seqs. So that gain is not mistaken for the
    # policy's, Sarathi with the same caps fixed: 4 x the seats, and 4 x the seats and the chunk.
    "ascendra-budget": Variant("ascendra-budget", "ascendra", deadline_seats=4),
    # ... and the prefill budget too, up to 4 x chunk_size (it loses on the A100 model: see README).
    "ascendra-budget-chunk": Variant("ascendra-budget-chunk", "ascendra", deadline_seats=4, deadline_chunk=4),
    "sarathi-seats": Variant("sarathi-seats", "sarathi", seats_factor=4),
    # Static splits, to judge the default one (and its HP ticket) against: no HP, two HPs.
    "ascendra-hp0": Variant("ascendra-hp0", "ascendra", num_hp=0),
    "ascendra-hp2": Variant("ascendra-hp2", "ascendra", num_hp=2),
    # Roles that follow the load, from the default split.
    "ascendra-adaptive": Variant("ascendra-adaptive", "ascendra", adaptive_roles=True),
    # Without routing by SLO class (every class competes for the HP's ticket alike).
    "ascendra-no-classes": Variant("ascendra-no-classes", "ascendra", class_routing=False),
    "sarathi-wide": Variant("sarathi-wide", "sarathi", seats_factor=4, chunk_factor=4),
}


@dataclass
class Setup:
    """Everything a point needs except the policy and the rate."""

    sim: SimConfig
    workload: WorkloadConfig
    cost: object  # step-time truth: predict(BatchShape)
    model: PerfModel  # what the system believes (fitted); policy + schedulers
    migration: MigrationCost
    trace: Sequence[TraceRow] | None = None
    label: str = ""  # model / hardware, for titles
    notes: list[str] = field(default_factory=list)

    def requests(self, rate: float) -> list[RequestSpec]:
        return build_workload(replace(self.workload, rate=rate), self.trace)


def to_request_results(res: SimResult) -> list[metrics.RequestResult]:
    out = []
    for seq in res.requests:
        n_out = seq.num_output_tokens
        times = seq.token_times if seq.token_times else (
            [] if seq.first_token_time is None else [seq.first_token_time, seq.last_token_time])
        r = metrics.RequestResult(
            index=seq.index, prompt_len=seq.num_prompt_tokens, output_len=seq.max_tokens,
            scheduled_s=seq.arrival_time, send_s=seq.arrival_time, token_times_s=times,
            end_s=seq.last_token_time if seq.last_token_time is not None else seq.arrival_time,
            n_out=n_out, prompt_tokens=seq.num_prompt_tokens, finish_reason=seq.finish_reason,
            ttft_slo_s=seq.ttft_slo, tbt_slo_s=seq.tbt_slo)  # each request against its own
        if seq.error is not None:
            r.error = f"error event: {seq.error}"
        elif n_out < seq.max_tokens:  # cut at max_model_len: the bench client counts it as failed
            r.error = f"short output: {n_out} of {seq.max_tokens} tokens"
        else:
            r.success = True
        out.append(r)
    return out


def simulate(setup: Setup, variant: Variant, rate: float, specs: list[RequestSpec] | None = None,
             with_requests: bool = False) -> dict:
    """One point: {"summary": bench summary, "error": None, "sim": simulator details}; with_requests
    adds bench.serve's per-request rows."""
    seats, chunk, v = setup.sim.max_num_seqs, setup.sim.chunk_size, variant
    cfg = replace(setup.sim, policy=v.policy, escalate_started=v.escalate_started,
                  escalate_stages=v.escalate_stages, admission=v.admission,
                  max_num_seqs=seats * v.seats_factor, chunk_size=chunk * v.chunk_factor,
                  max_seats=seats * v.deadline_seats if v.deadline_seats > 1 else None,
                  max_chunk=chunk * v.deadline_chunk if v.deadline_chunk > 1 else None,
                  num_hp=setup.sim.num_hp if v.num_hp is None else v.num_hp, adaptive_roles=v.adaptive_roles,
                  class_routing=v.class_routing)
    specs = setup.requests(rate) if specs is None else specs
    t0 = time.perf_counter()
    sim = Simulator(cfg, setup.cost, setup.model, setup.migration)
    res = sim.run(specs)
    wall = time.perf_counter() - t0
    results = to_request_results(res)
    summary = metrics.summarize(results, res.end_time - (specs[0].arrival_s if specs else 0.0),
                                cfg.ttft_slo, cfg.tbt_slo)
    out = {
        "summary": summary,
        "error": None,
        "policy": variant.name,
        "rate": rate,
        "sim": {
            "wall_s": wall, "events": res.num_events, "simulated_s": res.end_time,
            "migrations": res.migrations.as_dict(), "escalations": dict(sim.escalations_by_reason),
            "escalations_by_stage": dict(sim.escalations_by_stage), "rejected": sim.num_rejected,
            "hopeless": {"policy": sim.policy.num_hopeless,
                         "schedulers": sum(i.scheduler.num_hopeless for i in sim.instances)},
            "instances": res.instances,
            "role_changes": len(sim.policy.role_changes),
        },
    }
    if with_requests:
        out["requests"] = [request_dict(r) for r in results]
    return out


def search_capacity(run_point: Callable[[float], dict], rates: Sequence[float] | None, threshold: float = 0.9,
                    stop_below: float = 0.5, start: float = 1.0, refine: int = 4,
                    max_doublings: int = 14) -> dict[float, dict]:
    """Points along the rate axis enough to place the threshold crossing.

    With ``rates``: measure them in order, skipping those above the first rate whose attainment
    fell under ``stop_below``. Without: start at ``start`` and double (halve while even the start
    misses) until attainment falls under the threshold. Then bisect ``refine`` times between the
    last rate at or above the threshold and the first under it.
    """
    pts: dict[float, dict] = {}

    def att(r: float) -> float:
        if r not in pts:
            pts[r] = run_point(r)
        return pts[r]["summary"]["attainment"]

    if rates:
        for r in sorted(rates):
            if att(r) < stop_below:
                break
    else:
        r = start
        if att(r) < threshold:
            for _ in range(max_doublings):
                r /= 2
                if att(r) >= threshold:
                    break
        else:
            for _ in range(max_doublings):
                r *= 2
                if att(r) < threshold:
                    break
    for _ in range(refine):
        srt = sorted(pts)
        lo = next((a for a, b in zip(srt, srt[1:]) if att(a) >= threshold > att(b)), None)
        if lo is None:
            break
        hi = srt[srt.index(lo) + 1]
        att(_round_rate((lo + hi) / 2))
    return pts


def _round_rate(r: float) -> float:
    """Rates with few significant digits keep file names and tables readable."""
    if r <= 0 or not math.isfinite(r):
        return r
    return float(f"{r:.3g}")


def sweep_summary(points: dict[str, dict[float, dict]], setup: Setup, threshold: float, extra_config: dict) -> dict:
    """bench.compare's summary.json shape, plus what the simulator measured per point."""
    policies = list(points)
    rates = sorted({r for p in points.values() for r in p})
    cfg = setup.sim
    config = {"model": setup.label, "num_instances": cfg.num_instances, "simulated": True,
              "dataset": setup.workload.dataset, "num_requests": setup.workload.num_requests,
              "seed": setup.workload.seed, "num_blocks": cfg.num_blocks, "block_size": cfg.block_size,
              "max_num_seqs": cfg.max_num_seqs, "chunk_size": cfg.chunk_size, "max_model_len": cfg.max_model_len,
              "num_hp": cfg.num_hp, "perf_model_coef": setup.model.to_list(),
              "link_gb_s": setup.migration.bandwidth_bytes_s / 1e9, "link_latency_s": setup.migration.latency_s,
              } | extra_config
    slo = {"ttft_s": cfg.ttft_slo, "tbt_s": cfg.tbt_slo, "source": "given (simulated)"}
    one_repeat = {p: {r: [res] for r, res in by_rate.items()} for p, by_rate in points.items()}
    summary = summarize_sweep(one_repeat, policies, rates, slo, threshold, config)
    for row in summary["points"]:
        sim = points[row["policy"]][row["rate"]]["sim"]
        row["migrations"] = sim["migrations"]
        row["escalations"] = sim["escalations"]
    summary["notes"] = list(setup.notes)
    return summary


def best_baseline(caps: dict[str, float | None], baselines: Sequence[str] = ("vllm", "sarathi")) -> float | None:
    """The highest capacity among the baselines measured (None where none crossed)."""
    return max((caps[b] for b in baselines if caps.get(b)), default=None)


def ratio(caps: dict[str, float | None], ours: str = "ascendra", baselines: Sequence[str] = ("vllm", "sarathi")) -> float | None:
    best = best_baseline(caps, baselines)
    if not best or caps.get(ours) is None:
        return None
    return caps[ours] / best
