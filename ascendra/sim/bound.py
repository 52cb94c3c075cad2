"""An upper bound on the request rate any scheduler could sustain within the objectives.

The model: an instance in steady state runs identical steps, each holding B decodes (at most
``max_num_seqs``) and the prefill tokens that admit new requests as fast as decodes finish
(p = B x mean prompt / mean output), every step no longer than the TBT objective (each decode
gains one token a step, so longer steps would break the mean TBT of everyone decoding). A step's
time comes from the step-time source itself (``predict(BatchShape)``: the simulator's ground
truth, not the system's fitted model), with the decode context of a request halfway through its
output and the prefill attention pairs of chunks halfway through their prompt. Then
rate = B / (mean output x step time), maximised over B, times the instances.

Work is conserved (a request that misses still costs its tokens), so no scheduler sustains
more than this at 90% or any attainment, up to the model's two idealisations: real batches
are not always full and balanced, and a step cost that is concave in its tokens (GPUs) could
let uneven steps do slightly better than identical ones. TTFT is left out (it only lowers what
is reachable); memory caps B when the pool size is given. It bounds a sustained rate: a short run can absorb a burst
above it in its queue. With per-request objectives the tightest TBT caps the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ascendra.perf_model import BatchShape


@dataclass(frozen=True)
class Bound:
    rate: float  # req/s over all instances
    binding: str  # "tbt" (the step cap) or "seats" (max_num_seqs decodes a step)
    decodes: int  # B at the optimum
    step_s: float  # the optimum's step time


def throughput_bound(cost, requests: Sequence, tbt_slo: float | None, max_num_seqs: int,
                     num_instances: int, kv_tokens: int | None = None) -> Bound | None:
    """cost: anything with predict(BatchShape) -> seconds. requests: items with prompt_len,
    output_len and optionally tbt_slo_s (RequestSpec). kv_tokens: an instance's KV pool in tokens;
    it caps B at what the pool holds of requests halfway through their output ("memory")."""
    if not requests:
        return None
    n = len(requests)
    prompt = sum(r.prompt_len for r in requests) / n
    output = sum(r.output_len for r in requests) / n
    own = [getattr(r, "tbt_slo_s", None) for r in requests]
    tbts = [t if t is not None else tbt_slo for t in own]
    cap = min((t for t in tbts if t), default=None)
    context = prompt + output / 2
    seats = max_num_seqs
    if kv_tokens is not None:
        seats = max(1, min(seats, int(kv_tokens // context)))
    best: Bound | None = None
    for b in range(1, seats + 1):
        p = round(b * prompt / output)
        pairs = round(p * (prompt + min(p, prompt)) / 2)
        step = cost.predict(BatchShape(p, pairs, b, round(b * context)))
        if cap is not None and step > cap:
            if best is None:  # not even one decode fits the cap: the tightest step is the best there is
                best = Bound(num_instances / (output * step), "tbt", 1, step)
            return Bound(best.rate, "tbt", best.decodes, best.step_s)
        rate = num_instances * b / (output * step)
        if best is None or rate > best.rate:
            best = Bound(rate, "memory" if seats < max_num_seqs else "seats", b, step)
    return best
