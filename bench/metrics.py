"""Pure metric math for serving benchmarks.

No I/O and no clocks: everything here takes recorded numbers and returns numbers, so the
load generator, the policy comparison and a future simulator all score runs the same way.

Definitions (see DESIGN.md):
- TTFT = first token time - send time (the client cannot see the server's arrival time).
- A request's TBT for attainment is its mean gap (last - first) / (n_out - 1); the p99
  variant uses the p99 of that request's own inter-chunk gaps instead.
- Attainment = requests meeting both SLOs / all requests in the run (failed and unsent
  requests count in the denominator).
- Capacity = rate where attainment crosses the threshold (90%), linearly interpolated.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass
class RequestResult:
    """What the client saw for one request. Times are seconds from the start of the run."""

    index: int
    prompt_len: int  # prompt tokens asked for
    output_len: int  # max_tokens asked for
    scheduled_s: float  # planned send time
    send_s: float | None = None  # actual send time; None if never sent
    success: bool = False
    error: str | None = None  # failure reason, None on success
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens carried by each chunk
    end_s: float | None = None  # stream end ([DONE]) or failure time
    n_out: int = 0  # output tokens (usage when the server sends it, else counted chunks)
    prompt_tokens: int | None = None  # as reported by the server's usage
    finish_reason: str | None = None
    output_text: str | None = None  # only recorded when asked (--record-output-ids)
    output_ids: list[int] | None = None
    # The request's own objectives (mixed SLO classes); None: the run's.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation, like numpy's default."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def ttft(r: RequestResult) -> float | None:
    if r.send_s is None or not r.token_times_s:
        return None
    return r.token_times_s[0] - r.send_s


def gaps(r: RequestResult) -> list[float]:
    """Inter-chunk gaps (one chunk is normally one token)."""
    t = r.token_times_s
    return [b - a for a, b in zip(t, t[1:])]


def mean_tbt(r: RequestResult) -> float | None:
    """(last - first) / (n_out - 1); None when fewer than two tokens (no gap to judge)."""
    if r.n_out < 2 or len(r.token_times_s) < 1:
        return None
    return (r.token_times_s[-1] - r.token_times_s[0]) / (r.n_out - 1)


def p99_tbt(r: RequestResult) -> float | None:
    return percentile(gaps(r), 99)


def e2e(r: RequestResult) -> float | None:
    if r.send_s is None or r.end_s is None:
        return None
    return r.end_s - r.send_s


def meets_slo(r: RequestResult, ttft_slo: float, tbt_slo: float, variant: str = "mean") -> bool:
    """Both SLOs met by a successful request, each against the request's own objectives where it
    has them, else the run's. variant: 'mean' (the definition) or 'p99'."""
    if not r.success:
        return False
    if r.ttft_slo_s is not None:
        ttft_slo = r.ttft_slo_s
    if r.tbt_slo_s is not None:
        tbt_slo = r.tbt_slo_s
    t = ttft(r)
    if t is None or t > ttft_slo:
        return False
    tbt = mean_tbt(r) if variant == "mean" else p99_tbt(r)
    return tbt is None or tbt <= tbt_slo


def attainment(results: Sequence[RequestResult], ttft_slo: float, tbt_slo: float,
               variant: str = "mean") -> float:
    if not results:
        return 0.0
    return sum(meets_slo(r, ttft_slo, tbt_slo, variant) for r in results) / len(results)


def attainment_by_class(results: Sequence[RequestResult], ttft_slo: float, tbt_slo: float) -> dict[str, dict]:
    """Per SLO class ("TTFT/TBT" in seconds, each request's own objectives or the run's): how many
    requests, the share that met both, and the share that met the TTFT alone. Empty when every
    request shares the run's objectives."""
    groups: dict[tuple[float, float], list[RequestResult]] = {}
    for r in results:
        key = (r.ttft_slo_s if r.ttft_slo_s is not None else ttft_slo,
               r.tbt_slo_s if r.tbt_slo_s is not None else tbt_slo)
        groups.setdefault(key, []).append(r)
    if len(groups) < 2:
        return {}
    out = {}
    for (t, b), rs in sorted(groups.items()):
        first = [ttft(r) for r in rs if r.success]
        out[f"{t:g}/{b:g}"] = {"requests": len(rs), "attainment": attainment(rs, t, b),
                               "ttft_met": sum(v is not None and v <= t for v in first) / len(rs)}
    return out


def failure_reasons(results: Iterable[RequestResult]) -> dict[str, int]:
    """Failures grouped by the reason's kind (text before the first ':')."""
    c = Counter((r.error or "unknown").split(":", 1)[0] for r in results if not r.success)
    return dict(sorted(c.items()))


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float | None]:
    return {
        f"{prefix}_mean_s": mean(values),
        f"{prefix}_p50_s": percentile(values, 50),
        f"{prefix}_p99_s": percentile(values, 99),
    }


def summarize(results: Sequence[RequestResult], duration_s: float, ttft_slo: float,
              tbt_slo: float) -> dict:
    """The run's headline numbers. duration_s = wall time of the run (first send to last end)."""
    ok = [r for r in results if r.success]
    dur = duration_s if duration_s > 0 else float("nan")
    met = sum(meets_slo(r, ttft_slo, tbt_slo) for r in results)
    out_tokens = sum(r.n_out for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    lags = [r.send_s - r.scheduled_s for r in results if r.send_s is not None]
    s: dict = {
        "num_requests": len(results),
        "sent": sum(r.send_s is not None for r in results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failure_reasons": failure_reasons(results),
        "duration_s": duration_s,
        "ttft_slo_s": ttft_slo,
        "tbt_slo_s": tbt_slo,
        "attainment": attainment(results, ttft_slo, tbt_slo),
        "attainment_p99_tbt": attainment(results, ttft_slo, tbt_slo, "p99"),
        "attainment_by_class": attainment_by_class(results, ttft_slo, tbt_slo),
        "slo_met": met,
        "goodput_rps": met / dur,
        "request_throughput_rps": len(ok) / dur,
        "output_tok_s": out_tokens / dur,
        "input_tok_s": in_tokens / dur,
        "total_tok_s": (in_tokens + out_tokens) / dur,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
    }
    s.update(_stats("ttft", [v for r in ok if (v := ttft(r)) is not None]))
    s.update(_stats("tbt_mean", [v for r in ok if (v := mean_tbt(r)) is not None]))
    s.update(_stats("itl", [g for r in ok for g in gaps(r)]))
    s.update(_stats("e2e", [v for r in ok if (v := e2e(r)) is not None]))
    s["send_lag_p99_s"] = percentile(lags, 99)
    s["send_lag_max_s"] = max(lags) if lags else None
    # NaN is not JSON; a zero-length run has no rates.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}


@dataclass(frozen=True)
class Capacity:
    value: float | None
    bound: str  # "interpolated" | "lower_bound" (never fell below) | "upper_bound" | "none"

    def label(self) -> str:
        if self.value is None:
            return "n/a"
        mark = {"lower_bound": ">= ", "upper_bound": "< "}.get(self.bound, "")
        return f"{mark}{self.value:.3g}"


def capacity(points: Iterable[tuple[float, float]], threshold: float = 0.9) -> Capacity:
    """Rate where attainment first drops below threshold, interpolated between the last
    rate at or above it and the first below it. Points are (rate, attainment)."""
    pts = sorted(points)
    if not pts:
        return Capacity(None, "none")
    if pts[0][1] < threshold:
        return Capacity(pts[0][0], "upper_bound")
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 < threshold <= a0:
            frac = (a0 - threshold) / (a0 - a1)
            return Capacity(r0 + frac * (r1 - r0), "interpolated")
    return Capacity(pts[-1][0], "lower_bound")
