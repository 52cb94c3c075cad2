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

``work_bound`` drops the idealisations: no identical steps, no objectives, no seats. It prices
only the work every request brings, each part at the cheapest rate any step offers, so it holds
for every schedule, disaggregated or uneven ones too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ascendra.perf_model import BatchShape


@dataclass(frozen=True)
class Bound:
    rate: float  # req/s over all instances
    binding: str  # "tbt" (the step cap), "seats" (max_num_seqs decodes a step), "memory"; split: "k prefill, <side>"
    decodes: int  # B at the optimum
    step_s: float  # the optimum's step time


# Step sizes work_bound tries when it looks for the cheapest price of a token: geometric up to
# ~124k tokens (far past any chunk), so a per-step constant is spread as thin as it can be.
_PRICE_TOKENS = sorted({round(1.1 ** k) for k in range(124)})


def _cheapest(cost, shape_of) -> float:
    """The lowest step time per token over step sizes (a step of n such tokens never costs less
    than n times this), never below 0."""
    return max(0.0, min(cost.predict(shape_of(n)) / n for n in _PRICE_TOKENS))


def work_bound(cost, requests: Sequence, num_instances: int) -> float | None:
    """The highest rate at which num_instances could do nothing but the requests' own work.

    Every prompt token at the lowest price per token any step size reaches (the step's own
    constant included, so a step of n tokens never costs less than n times it), every output
    token after the first at that or the decode's own lowest price, whichever is less; each
    prompt's attention over the fewest pairs any chunking attends (P (P + 1) / 2, one token a
    chunk); each output token's read of its context. No seats, no objectives, no step shape:
    no scheduler sustains more, at any attainment. Assumes the step source adds these terms, as
    every source here does (up to SharedHostCost's width factors, which scale whole steps by 0.96
    and up)."""
    if not requests:
        return None
    token = _cheapest(cost, lambda n: BatchShape(n, 0, 0, 0))
    decode = min(token, _cheapest(cost, lambda n: BatchShape(0, 0, n, 0)))
    n = 1 << 12
    pair = max(0.0, (cost.predict(BatchShape(n, n * n, 0, 0)) - cost.predict(BatchShape(n, 0, 0, 0))) / (n * n))
    ctx = max(0.0, (cost.predict(BatchShape(0, 0, 1, n)) - cost.predict(BatchShape(0, 0, 1, 0))) / n)
    work = 0.0
    for r in requests:
        p, o = r.prompt_len, r.output_len
        work += (token * p + decode * (o - 1) + pair * p * (p + 1) / 2
                 + ctx * ((o - 1) * p + (o - 1) * o / 2))
    return num_instances * len(requests) / work


def _tightest_tbt(requests: Sequence, tbt_slo: float | None) -> float | None:
    """The tightest TBT objective among the requests' own (tbt_slo_s) and tbt_slo for the rest."""
    own = [getattr(r, "tbt_slo_s", None) for r in requests]
    return min((t for t in (o if o is not None else tbt_slo for o in own) if t), default=None)


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
    cap = _tightest_tbt(requests, tbt_slo)
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


def disaggregated_bound(cost, requests: Sequence, tbt_slo: float | None, max_num_seqs: int,
                        num_instances: int) -> Bound | None:
    """The best steady state of a split deployment: k instances only prefill, the others only
    decode, and KV moves between them for free; maximised over k.

    A prefill instance runs each prompt whole in a step of its own, attending the fewest pairs
    any chunking does (P (P + 1) / 2), so no decode waits on it and no TBT caps it. A decode
    instance runs identical steps of B decodes (at most max_num_seqs) at the context of a request
    halfway through its output, each within the tightest TBT, producing every token but the
    first. On the paper scenario's long-prompt workloads it lies under throughput_bound: prompts
    are most of the work there, and moving them off the decoding instances makes them no cheaper."""
    if not requests or num_instances < 2:
        return None
    n = len(requests)
    prefill_s = sum(cost.predict(BatchShape(r.prompt_len, r.prompt_len * (r.prompt_len + 1) // 2, 0, 0))
                    for r in requests) / n
    later = sum(r.output_len - 1 for r in requests) / n  # tokens after the first, per request
    context = sum(r.prompt_len + r.output_len / 2 for r in requests) / n
    cap = _tightest_tbt(requests, tbt_slo)
    decode_rate, best_b, best_step = math.inf, 0, 0.0
    if later > 0:
        decode_rate = 0.0
        for b in range(1, max_num_seqs + 1):
            step = cost.predict(BatchShape(0, 0, b, round(b * context)))
            if cap is not None and step > cap:
                break
            if b / (later * step) > decode_rate:
                decode_rate, best_b, best_step = b / (later * step), b, step
    best: Bound | None = None
    for k in range(1, num_instances):
        prefill, decode = k / prefill_s, (num_instances - k) * decode_rate
        rate = min(prefill, decode)
        if best is None or rate > best.rate:
            best = Bound(rate, f"{k} prefill, " + ("prefill" if prefill <= decode else "decode"), best_b, best_step)
    return best
