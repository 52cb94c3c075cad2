"""An upper bound on the request rate any scheduler could sustain within the objectives.

The model (pure arithmetic on a linear step-time model, ``PerfModel`` coefficients
c0 + c1 * prefill tokens + c2 * prefill attention pairs + c3 * decodes + c4 * decode context):

- Work is conserved: every request costs its token work, whoever serves it and whenever:
  W = c1 * P + c2 * P^2 / 2 + c3 * D + c4 * (P * D + D^2 / 2) seconds (prompt P, output D;
  prefill pairs at least P^2 / 2 however it is chunked; decode k reads P + k tokens).
- Every step also pays c0. While requests decode, a step must come at least every TBT
  objective on average (each decode gains one token a step and its mean gap must stay inside
  the objective), so an instance runs at least 1 / TBT steps a second; and it holds at most
  ``max_num_seqs`` decodes, so it needs at least rate * D / max_num_seqs steps a second.
- One instance's second holds: rate * W + c0 * steps <= 1, so
  rate <= min((1 - c0 / TBT) / W, 1 / (W + c0 * D / max_num_seqs)), times the instances.

Averages are over the workload's requests; with per-request objectives the tightest TBT
sets the step floor. TTFT is not in the bound (a scheduler may delay nothing but its queue),
nor memory. So no scheduler can sustain more than this with 90% or any attainment: the
requests that miss still cost their work. It bounds a sustained rate: a short run can
absorb a burst above it in its queue. A bound, not a prediction: real steps are not exactly
linear, and batches are not always full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Bound:
    rate: float  # req/s over all instances
    binding: str  # "tbt" (step floor from the TBT objective) or "seats" (max_num_seqs)
    work_s: float  # mean token work per request (seconds of one instance)


def throughput_bound(coef: Sequence[float], requests: Sequence, tbt_slo: float | None, max_num_seqs: int,
                     num_instances: int) -> Bound | None:
    """requests: items with prompt_len, output_len and optionally tbt_slo_s (RequestSpec)."""
    if not requests:
        return None
    c0, c1, c2, c3, c4 = (float(c) for c in coef)
    n = len(requests)
    work = dec = 0.0
    tbts = []
    for r in requests:
        p, d = r.prompt_len, r.output_len
        work += c1 * p + c2 * p * p / 2 + c3 * d + c4 * (p * d + d * d / 2)
        dec += d
        own = getattr(r, "tbt_slo_s", None)
        tbts.append(own if own is not None else tbt_slo)
    work /= n
    dec /= n
    tight = min((t for t in tbts if t), default=None)
    by_tbt = (1 - c0 / tight) / work if tight else 1.0 / work
    by_seats = 1.0 / (work + c0 * dec / max_num_seqs)
    if by_tbt <= by_seats:
        return Bound(max(by_tbt, 0.0) * num_instances, "tbt", work)
    return Bound(by_seats * num_instances, "seats", work)
