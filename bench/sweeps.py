"""A rate sweep's bookkeeping (pure): where each measured point is saved, one row per point,
capacity per policy in the summary, and greedy outputs compared across policies."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from . import metrics


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
            "tbt_mean_p99_s", "itl_p99_s", "e2e_p50_s", "failure_reasons", "attainment_by_class")
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


def summarize_sweep(results: dict[str, dict[float, dict]], policies: Sequence[str], rates: Sequence[float],
                    slo: dict | None, threshold: float, config: dict) -> dict:
    points = [point_row(p, r, results[p][r]) for p in policies for r in rates if r in results[p]]
    # Capacity is a rate: a burst point (rate inf) is reported but not interpolated against.
    caps = {p: metrics.capacity([(pt["rate"], pt["attainment"]) for pt in points
                                 if pt["policy"] == p and math.isfinite(pt["rate"])], threshold) for p in policies}
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
