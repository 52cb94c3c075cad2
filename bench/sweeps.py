"""A rate sweep's bookkeeping (pure): where each measured point is saved, one row per point,
capacity per policy in the summary, and greedy outputs compared across policies.

A point may be measured more than once (`bench.compare --repeats`): results are
{policy: {rate: [result of repeat 0, repeat 1, ...]}}, capacity is read off the attainment
pooled over the repeats, and each repeat's own capacity is reported beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from . import metrics


def rate_tag(rate: float) -> str:
    return f"rate_{rate:g}".replace(".", "p")


def point_path(out: Path, policy: str, rate: float, repeat: int = 0) -> Path:
    # Repeat 0 keeps the name a single-run sweep always had, so old --out directories resume.
    suffix = f"_rep{repeat}" if repeat else ""
    return out / "points" / policy / f"{rate_tag(rate)}{suffix}.json"


def load_point(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def point_row(policy: str, rate: float, result: dict, repeat: int = 0) -> dict:
    s = result["summary"]
    keys = ("attainment", "attainment_p99_tbt", "goodput_rps", "completed", "failed", "num_requests",
            "request_throughput_rps", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "tbt_mean_p50_s",
            "tbt_mean_p99_s", "itl_p99_s", "e2e_p50_s", "failure_reasons", "attainment_by_class")
    return ({"policy": policy, "rate": rate, "repeat": repeat} | {k: s.get(k) for k in keys}
            | {"error": result.get("error")})


def pooled_row(policy: str, rate: float, rows: Sequence[dict]) -> dict:
    """One rate's repeats as one point: attainment over all their requests together."""
    if len(rows) == 1:
        return {"policy": policy, "rate": rate, "repeats": 1, "attainment": rows[0]["attainment"],
                "attainment_p99_tbt": rows[0]["attainment_p99_tbt"], "attainment_per_repeat": [rows[0]["attainment"]]}
    n = sum(r["num_requests"] for r in rows)
    mean = lambda k: sum(r[k] * r["num_requests"] for r in rows) / n if n else 0.0  # noqa: E731
    return {"policy": policy, "rate": rate, "repeats": len(rows), "attainment": mean("attainment"),
            "attainment_p99_tbt": mean("attainment_p99_tbt"),
            "attainment_per_repeat": [r["attainment"] for r in rows]}


def output_of(req: dict) -> list | str | None:
    return req.get("output_ids") if req.get("output_ids") is not None else req.get("output_text")


def check_outputs(results: dict[str, dict[float, list[dict]]], policies: Sequence[str]) -> dict:
    """Compare per-request greedy outputs of every policy with the first one's, request by
    request (same seed -> same prompts) and repeat by repeat, over requests that completed
    under both."""
    ref = policies[0]
    report: dict = {"reference": ref, "policies": {}}
    for pol in policies[1:]:
        compared, mismatches, examples = 0, 0, []
        for rate, repeats in sorted(results.get(pol, {}).items()):
            for res, ref_res in zip(repeats, results.get(ref, {}).get(rate, [])):
                c, m, ex = _compare_point(res, ref_res, rate)
                compared, mismatches = compared + c, mismatches + m
                examples += ex[:10 - len(examples)]
        report["policies"][pol] = {"compared": compared, "mismatches": mismatches, "examples": examples}
    report["identical"] = all(v["mismatches"] == 0 and v["compared"] > 0 for v in report["policies"].values())
    return report


def _compare_point(res: dict, ref_res: dict, rate: float) -> tuple[int, int, list[dict]]:
    compared, mismatches, examples = 0, 0, []
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
            pos = next((i for i, (x, y) in enumerate(zip(oa, ob)) if x != y), min(len(oa), len(ob)))
            examples.append({"rate": rate, "index": r["index"], "first_diff_at": pos})
    return compared, mismatches, examples


def summarize_sweep(results: dict[str, dict[float, list[dict]]], policies: Sequence[str], rates: Sequence[float],
                    slo: dict | None, threshold: float, config: dict) -> dict:
    points = [point_row(p, r, res, k) for p in policies for r in rates for k, res in enumerate(results[p].get(r, []))]
    pooled = [pooled_row(p, r, rows) for p in policies for r in rates
              if (rows := [pt for pt in points if pt["policy"] == p and pt["rate"] == r])]

    def cap(rows: Sequence[dict]) -> metrics.Capacity:
        # Capacity is a rate: a burst point (rate inf) is reported but not interpolated against.
        return metrics.capacity([(pt["rate"], pt["attainment"]) for pt in rows if math.isfinite(pt["rate"])],
                                threshold)

    caps = {p: cap([pt for pt in pooled if pt["policy"] == p]) for p in policies}
    summary = {
        "capacity_rps": {p: c.value for p, c in caps.items()},
        "capacity": {p: _capacity_dict(c) for p, c in caps.items()},
        "threshold": threshold,
        "policies": list(policies),
        "rates": list(rates),
        "slo": slo or {"ttft_s": None, "tbt_s": None, "source": "not measured"},
        "config": config,
        "points": points,
        "pooled": pooled,
    }
    summary["paired"] = paired(points, policies)
    repeats = max((pt["repeat"] + 1 for pt in points), default=1)
    if repeats > 1:
        # Each repeat's curve on its own: how far one run's capacity can be trusted.
        summary["capacity_by_repeat"] = {
            p: [_capacity_dict(cap([pt for pt in points if pt["policy"] == p and pt["repeat"] == k]))
                for k in range(repeats)]
            for p in policies}
    return summary


def _capacity_dict(c: metrics.Capacity) -> dict:
    return {"value": c.value, "bound": c.bound, "label": c.label()}


def paired(points: Sequence[dict], policies: Sequence[str]) -> dict:
    """Each policy against the first, point by point (same rate, same repeat, same requests):
    how often it scored higher or lower, and the mean difference in attainment. With
    --interleave the two points of a pair ran back to back, on the box as it was then, which a
    capacity read off curves measured minutes apart does not guarantee."""
    ref = policies[0] if policies else None
    by = {(pt["policy"], pt["rate"], pt["repeat"]): pt["attainment"] for pt in points}
    out = {}
    for p in policies[1:]:
        diffs = [by[p, r, k] - a for (q, r, k), a in by.items() if q == ref and (p, r, k) in by]
        out[p] = {"reference": ref, "pairs": len(diffs), "higher": sum(d > 0 for d in diffs),
                  "lower": sum(d < 0 for d in diffs),
                  "mean_difference": sum(diffs) / len(diffs) if diffs else None}
    return out
