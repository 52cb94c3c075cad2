"""Ascendra's coordinator policy: route, predict who is about to miss, escalate them.

Pure code (no I/O, no clock reads, no torch): the server and the simulator drive it with
the times they measured or simulated.

- Routing: new requests go to the least-loaded of the LP instances and the HP instances
  that hold a "ticket" (no escalated work queued, under half their seats used, over 10% of
  their blocks free, and a predicted first token inside the request's TTFT objective). At low
  load traffic spreads over every instance, so one instance's death takes down only its share.
  A request no LP can serve in time goes to the least-loaded instance of all, as best-effort.
  With SLO classes, the tightest TBT class goes to an HP that can keep its pace (its decodes
  with one more inside the objective, its recent steps well inside it), else to an LP; looser
  classes share that HP only once the LPs are busy and while its steps stay well inside the
  tightest objective it holds.
- Prediction, after every LP step: the LP serves waiting prompts least-slack-first at its
  prefill budget (chunk_size - decodes, or less: what it measured prefilling per step while
  prompts waited, since its scheduler trims the budget to keep decodes on pace), so a
  request's first token comes after the prompt tokens ahead of it in that order; each step
  takes the performance model's prediction for that batch. A decoding request is at risk
  of its mean TBT when even decode-only LP steps could not keep it inside the objective.
- Escalation: a request predicted to miss goes to the HP instance with the most headroom,
  if that instance is predicted to meet the objective. The safety margin is the model's
  own recent p90 relative error, not a per-model constant. Started requests move with
  their KV (``escalate_started``; off reproduces the paper's code, which only moves
  requests that have not started).
- Roles that follow the load (``adaptive_roles``, off by default): the split starts as planned;
  an LP step that finds a request at risk that no HP can take promotes the least-loaded other LP
  to HP at once, and an HP that no escalation has reached for ``ROLE_IDLE_TTFTS`` times the
  longest TTFT objective seen, nor any role changed, goes back to LP (one LP always remains). The local batch rules of the
  two roles are the same (``scheduler.py``), so a role is the policy's alone: routing, the
  ticket and escalation follow it, and the worker is not told.
- The hopeless yield: a request whose TTFT passed without a first token, or whose first
  token came too late, is never escalated (moving it saves nobody); hopeless prompts still
  waiting on an LP spill to an HP holding the ticket, so when the objectives are out of reach
  every instance works at full speed, as the baselines' would. ``num_hopeless`` counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ascendra.block_manager import blocks_for
from ascendra.config import default
from ascendra.perf_model import BatchShape, PerfModel
from ascendra.router import Escalation, InstanceSpec, Policy, RouteRequest, StepStats, least_loaded

# How much of the model's recent relative error pads every prediction (a quantile).
ERROR_QUANTILE = 0.9
# Weight of the newest step in the running average of prefill tokens per step.
PREFILL_RATE_SMOOTHING = 0.2
# The HP ticket: new work only while under this share of its seats is used ...
TICKET_SEAT_SHARE = 0.5
# ... and this share of its KV blocks stays free after the request's own.
HP_FREE_BLOCK_RESERVE = 0.1
# Blocks an escalated started request is assumed to need beyond its tokens so far.
ESCALATION_GROWTH_TOKENS = 64
# A decode this close to its last token is not worth moving for its TBT.
MIN_TOKENS_LEFT_TO_ESCALATE = 4
# Adaptive roles: an HP no escalation reached for this many times the longest TTFT objective seen,
# and no role change either, returns to LP (hysteresis against flapping).
ROLE_IDLE_TTFTS = 4.0
# The tight SLO class goes to an HP only while the HP's recent steps average under this share of
# the request's TBT objective; past it the HP's decodes are paced at the edge already, and one more
# stream of tight prompts tips them over, so the request goes to an LP, whose pacing serves it
# ahead of the looser class (simulated on the CPU's logged steps with their noise, 30% at
# 0.15 s / 0.03 s, mean of 8 noise seeds: with _hopeless_on's least-slack estimate, the tight
# class met 84.1 -> 89.7% at 7 req/s and 75.3 -> 83.0% at 8; keeping it on the LP even past what
# the LP can serve in time cost capacity on 1,000 requests, 11.0 against 12.0 req/s).
TIGHT_PACE_SHARE = 0.9
# The looser class shares an HP that serves a tighter one once every LP's steps average over
# this share of the looser class's TBT objective (the LP is busy, not idle), while the HP's steps
# average under TIGHT_PACE_SHARE of the tightest objective it holds. Keeping the looser class
# off the HP altogether left the LP holding 62% of the prompt tokens on the real CPU server, and
# a wide LP's steps grow faster than linearly with its decodes (see sim/costs.py, width_factor):
# simulated on a real run's logged steps with their noise (1,000 mixed-class requests, trace
# arrivals, mean of 8 seeds) capacity rose 18.59 -> 21.76 req/s (Sarathi 18.34); on 4 seeds a
# share of 0 to 0.3 gave 21.4-22.4.
BALANCE_LP_SHARE = 0.2
# Weight of the newest step in an instance's running average of step time.
STEP_TIME_SMOOTHING = 0.2


@dataclass
class _Req:
    request_id: str
    instance_id: int
    prompt_tokens: int
    max_tokens: int
    arrival: float
    ttft_slo: float | None
    tbt_slo: float | None
    n_out: int = 0
    first: float | None = None
    last: float | None = None
    migrating: bool = False
    dst: int | None = None  # where an escalation in flight is taking it
    retry_after: float = -math.inf  # after a failed escalation, wait before trying again
    hopeless: bool = False  # can no longer meet its objectives: never escalated

    @property
    def ttft_deadline(self) -> float:
        return math.inf if self.ttft_slo is None else self.arrival + self.ttft_slo


@dataclass
class _Instance:
    perf: PerfModel
    chunk_size: int = default("chunk_size")
    max_num_seqs: int = default("max_num_seqs")
    block_size: int = 16  # until configure_instance reports the worker's
    decodes: int = 0
    decode_context: int = 0
    incoming: int = 0  # escalations in flight towards this instance
    # Prefill tokens per step while prompts wait: the instance's effective prefill budget, which
    # its local scheduler trims below chunk_size to keep decodes on pace. None until measured.
    prefill_per_step: float | None = None
    # Running average of the instance's step time while it has requests (0 when it has none).
    step_time_avg: float = 0.0

    def prefill_budget(self) -> int:
        full = max(self.chunk_size - self.decodes, 1)
        if self.prefill_per_step is None:
            return full
        return max(1, min(full, int(self.prefill_per_step)))


def _load(inst) -> int:
    """Requests an instance holds: what it last reported, or what was routed there since."""
    return max(inst.num_assigned, inst.num_running + inst.num_waiting)


class AscendraPolicy(Policy):
    name = "ascendra"

    def __init__(self, specs: list[InstanceSpec], escalate_started: bool = True,
                 max_incoming_per_hp: int = 2, retry_delay: float = 0.5,
                 force_escalation_after: int | None = None, adaptive_roles: bool = False,
                 class_routing: bool = True) -> None:
        super().__init__(specs)
        self.adaptive_roles = adaptive_roles
        self.class_routing = class_routing
        self.role_changes: list[tuple[float, int, str]] = []  # (time, instance, new role)
        self._last_role_change = -math.inf
        self._last_escalated_to = {s.instance_id: -math.inf for s in specs}  # HP: when it last got one
        self._longest_ttft = 0.0
        self._loosest_tbt = 0.0
        self.escalate_started = escalate_started
        # Testing and measurement: escalate every LP request after this many tokens.
        self.force_after = force_escalation_after
        self.max_incoming = max_incoming_per_hp
        self.retry_delay = retry_delay
        self.state = {s.instance_id: _Instance(PerfModel()) for s in specs}
        self.reqs: dict[str, _Req] = {}
        self.on_instance: dict[int, dict[str, _Req]] = {s.instance_id: {} for s in specs}
        # Requests judged unable to meet their objectives (TTFT passed without a first token, or
        # first token after it): they are served best-effort and never escalated. A metric.
        self.num_hopeless = 0

    # ------------------------------------------------------------------ setup and events
    def configure_instance(self, instance_id: int, perf_coef: list[float], chunk_size: int,
                           max_num_seqs: int, block_size: int) -> None:
        st = self.state[instance_id]
        if perf_coef:
            st.perf = PerfModel.from_list(perf_coef)
        st.chunk_size, st.max_num_seqs, st.block_size = chunk_size, max_num_seqs, block_size

    def step_time_model(self, instance_id: int) -> PerfModel | None:
        return self.state[instance_id].perf

    def route(self, req: RouteRequest) -> int | None:
        """The least-loaded of the LP instances and the HP instances that hold a ticket.

        An HP instance takes new work only while it holds the ticket (nothing escalated queued,
        under half its seats used, blocks to spare, and a predicted first token inside the
        request's TTFT objective), and then competes on load like any LP. So at low load traffic
        spreads over every instance, and one instance's death takes only its share down with it;
        under load the HP's ticket closes and it keeps its headroom for escalations.
        """
        candidates = [i for i in self.instances if i.role == "lp"]
        if self.force_after is None:
            deadline = req.arrival_time + (req.ttft_slo or math.inf)
            if self.class_routing and self._tighter_than_seen(req.tbt_slo):
                hp = self._best_hp(req.num_prompt_tokens, 0, req.max_tokens, deadline, req.tbt_slo, req.arrival_time,
                                   started=False, new_request=True, tight=True)
                if hp is not None:
                    return hp
                # No HP can keep this one's pace: an LP serves it, not the HP through the ticket
                # (which looks at TTFT only); past what an LP can serve in time it spills below.
            else:
                hp = self._best_hp(req.num_prompt_tokens, 0, req.max_tokens, deadline, req.tbt_slo, req.arrival_time,
                                   started=False, new_request=True)
                if hp is not None and self.class_routing:
                    tightest = self._tightest_tbt(hp)
                    own = math.inf if req.tbt_slo is None else req.tbt_slo
                    if tightest < own and not self._balance_to_hp(hp, tightest, req.tbt_slo):
                        hp = None  # keep the HP's steps short for the tighter class it serves
                if hp is not None:
                    candidates.append(self.instances[hp])
        lp = least_loaded(candidates)
        if lp is not None and lp.role == "lp" and self._hopeless_on(lp, req):
            # Beyond what the objectives allow: no instance would serve it in time, so it is
            # best-effort work for whichever instance has the least (HP included), as the
            # baselines would share it; there it goes after every hopeful request.
            candidates = [i for i in self.instances if i.alive]
        inst = least_loaded(candidates)
        if inst is None:  # every LP instance is gone and no HP has a ticket: HP instances still serve
            inst = least_loaded([i for i in self.instances if i.role == "hp"])
        return inst.instance_id if inst is not None else None

    def _tighter_than_seen(self, tbt_slo: float | None) -> bool:
        """Whether a looser TBT class than tbt_slo has been seen (so this request is the tight kind)."""
        return tbt_slo is not None and tbt_slo < self._loosest_tbt

    def _tightest_tbt(self, instance_id: int) -> float:
        """The tightest TBT objective among the requests an instance holds (inf if none has one)."""
        return min((r.tbt_slo for r in self.on_instance[instance_id].values() if r.tbt_slo is not None),
                   default=math.inf)

    def _balance_to_hp(self, hp: int, tightest: float, tbt_slo: float | None) -> bool:
        """Whether a looser-class request may share an HP whose tightest TBT objective is
        `tightest`: every LP's steps have grown past BALANCE_LP_SHARE of the request's TBT
        objective while the HP's stay under TIGHT_PACE_SHARE of `tightest` (the pace check the
        tight class itself passes to get there)."""
        if tbt_slo is None:
            return False
        lps = [self.state[i.instance_id].step_time_avg for i in self.instances if i.role == "lp" and i.alive]
        return (bool(lps) and min(lps) > BALANCE_LP_SHARE * tbt_slo
                and self.state[hp].step_time_avg < TIGHT_PACE_SHARE * tightest)

    def would_miss(self, req: RouteRequest) -> bool:
        """SLO-aware admission: True when no live instance is predicted to give req its first token
        inside its TTFT objective (every LP's queue ahead of it is too long, and no HP could
        take it in time). A server with admission control answers 429 at arrival, counted as a
        miss; without it the request is served best-effort."""
        if req.ttft_slo is None:
            return False
        lps = [i for i in self.instances if i.role == "lp" and i.alive]
        if any(not self._hopeless_on(i, req) for i in lps):
            return False
        deadline = req.arrival_time + req.ttft_slo
        return self._best_hp(req.num_prompt_tokens, 0, req.max_tokens, deadline, req.tbt_slo, req.arrival_time,
                             started=False) is None

    def _hopeless_on(self, inst, req: RouteRequest) -> bool:
        """Whether an LP instance would miss req's TTFT. The LP serves prompts least slack first,
        so only those not started and due no later than req count as ahead of it: a tight prompt
        passes a queue of looser ones. (Counting every queued prompt spilled tight requests off an
        LP that would have served them in time; simulated on the CPU's logged steps with their
        noise, the tight class met 86.5 -> 89.7% at 7 req/s and 78.0 -> 83.0% at 8, and capacity
        on the 300 requests rose 9.29 -> 9.79 req/s; single-class workloads are unchanged.)"""
        if req.ttft_slo is None:
            return False
        st = self.state[inst.instance_id]
        budget = st.prefill_budget()
        step = st.perf.step_time(budget, st.decodes, st.decode_context)
        deadline = req.arrival_time + req.ttft_slo
        ahead = sum(r.prompt_tokens for r in self.on_instance[inst.instance_id].values()
                    if r.first is None and r.ttft_deadline <= deadline)
        queued = min(inst.unstarted_prompt_tokens, ahead) + req.num_prompt_tokens
        return req.arrival_time + math.ceil(queued / budget) * step > req.arrival_time + req.ttft_slo

    def on_dispatch(self, instance_id: int, req: RouteRequest) -> None:
        super().on_dispatch(instance_id, req)
        if req.ttft_slo is not None and req.ttft_slo > self._longest_ttft:
            self._longest_ttft = req.ttft_slo
        if req.tbt_slo is not None and req.tbt_slo > self._loosest_tbt:
            self._loosest_tbt = req.tbt_slo
        r = _Req(req.request_id, instance_id, req.num_prompt_tokens, req.max_tokens, req.arrival_time,
                 req.ttft_slo, req.tbt_slo)
        self.reqs[req.request_id] = r
        self.on_instance[instance_id][req.request_id] = r

    def on_tokens(self, request_id: str, n_new: int, now: float) -> None:
        r = self.reqs.get(request_id)
        if r is None or n_new <= 0:
            return
        if r.first is None:
            r.first = now
            self.on_first_token(request_id)
        r.n_out += n_new
        r.last = now

    def on_finish(self, request_id: str) -> None:
        super().on_finish(request_id)
        r = self.reqs.pop(request_id, None)
        if r is not None:
            self._incoming_done(r)
            self.on_instance[r.instance_id].pop(request_id, None)

    def on_migrated(self, request_id: str, dst: int, now: float) -> None:
        r = self.reqs.get(request_id)
        if r is None:
            return
        self._incoming_done(r)
        r.migrating = False
        t = self._requests.get(request_id)
        if t is not None:  # move the router's bookkeeping with the request
            old, new = self.instances[t.instance_id], self.instances[dst]
            old.num_assigned -= 1
            new.num_assigned += 1
            if not t.started:
                old.num_unstarted -= 1
                old.unstarted_prompt_tokens -= t.num_prompt_tokens
                new.num_unstarted += 1
                new.unstarted_prompt_tokens += t.num_prompt_tokens
            t.instance_id = dst
        self.on_instance[r.instance_id].pop(request_id, None)
        self.on_instance[dst][request_id] = r
        r.instance_id = dst

    def on_migration_failed(self, request_id: str, now: float) -> None:
        r = self.reqs.get(request_id)
        if r is None:
            return
        self._incoming_done(r)
        r.migrating = False
        r.retry_after = now + self.retry_delay

    def on_step(self, instance_id: int, step: StepStats) -> list[Escalation]:
        self._record_step(instance_id, step)
        st = self.state[instance_id]
        if step.num_seqs:
            st.decodes = step.num_decode_tokens
            st.decode_context = step.decode_context_tokens
            shape = BatchShape(step.num_prefill_tokens, step.prefill_attention_pairs, st.decodes, st.decode_context)
            st.perf.observe(shape, step.step_time)
            a = STEP_TIME_SMOOTHING
            st.step_time_avg = (1 - a) * st.step_time_avg + a * step.step_time
            n = shape.prefill_tokens
            if step.num_waiting > 0 and n > 0:  # prompts were left waiting: what the budget allowed
                a = PREFILL_RATE_SMOOTHING
                st.prefill_per_step = n if st.prefill_per_step is None else (1 - a) * st.prefill_per_step + a * n
        elif step.num_running == 0:
            st.decodes, st.decode_context = 0, 0
        if step.num_running == 0 and step.num_waiting == 0:
            st.step_time_avg = 0.0  # idle: nothing is paced there any more
        if self.instances[instance_id].role != "lp":
            if self.adaptive_roles:
                self._maybe_demote(instance_id, step.time)
            return []
        return self._escalations(instance_id, step.time)

    # ------------------------------------------------------------------ adaptive roles
    def _role_window(self) -> float:
        return ROLE_IDLE_TTFTS * self._longest_ttft

    def _set_role(self, instance_id: int, role: str, now: float) -> None:
        inst = self.instances[instance_id]
        inst.spec = replace(inst.spec, role=role)
        self._last_role_change = now
        self._last_escalated_to[instance_id] = now  # a fresh HP gets its full window
        self.role_changes.append((now, instance_id, role))

    def _maybe_promote(self, src: int, now: float) -> int | None:
        """A request at risk on LP ``src`` found no HP to take it: the least-loaded other live LP
        becomes HP at once (unless it is the last LP standing); only demotion waits a window."""
        lps = [i for i in self.instances if i.role == "lp" and i.alive]
        if len(lps) < 2:
            return None
        pick = least_loaded([i for i in lps if i.instance_id != src])
        if pick is None:
            return None
        self._set_role(pick.instance_id, "hp", now)
        return pick.instance_id

    def _maybe_demote(self, instance_id: int, now: float) -> None:
        """An HP that no escalation reached for the window serves better as an LP."""
        window = self._role_window()
        if not window or now - self._last_role_change < window or now - self._last_escalated_to[instance_id] < window:
            return
        if self.state[instance_id].incoming:
            return
        self._set_role(instance_id, "lp", now)

    # ------------------------------------------------------------------ prediction
    def predicted_first_token(self, instance_id: int, now: float) -> dict[str, float]:
        """When each request on this instance that has no token yet should get its first one."""
        st = self.state[instance_id]
        waiting = [r for r in self.on_instance[instance_id].values() if r.first is None and not r.migrating]
        # The LP order: least slack first, hopeless ones last (as the lp scheduler does).
        def key(r: _Req):
            slack = r.ttft_deadline - now - st.perf.prefill_time(r.prompt_tokens)
            return (slack < 0, slack, r.arrival)

        waiting.sort(key=key)
        budget = st.prefill_budget()
        step = st.perf.step_time(budget, st.decodes, st.decode_context)
        out, ahead = {}, 0
        for r in waiting:
            ahead += r.prompt_tokens
            steps = math.ceil(ahead / budget)
            out[r.request_id] = now + steps * step
        return out

    def lp_step_time(self, instance_id: int) -> float:
        """Predicted step on an instance: its decodes, plus its prefill budget while prompts wait."""
        st = self.state[instance_id]
        prefill = st.prefill_budget() if self.instances[instance_id].num_waiting else 0
        return st.perf.step_time(prefill, st.decodes, st.decode_context)

    def projected_mean_tbt(self, r: _Req, step: float) -> float | None:
        """Mean TBT if every remaining token takes `step` seconds."""
        if r.first is None or r.last is None or r.n_out < 2 or r.max_tokens <= 1:
            return None
        remaining = max(r.max_tokens - r.n_out, 0)
        return (r.last - r.first + remaining * step) / (r.max_tokens - 1)

    def _forced(self, instance_id: int, now: float) -> list[Escalation]:
        out = []
        hps = [i.instance_id for i in self.instances if i.role == "hp" and i.alive]
        for r in self.on_instance[instance_id].values():
            if r.migrating or now < r.retry_after or not hps:
                continue
            if r.n_out >= self.force_after and (self.escalate_started or r.n_out == 0):
                dst = min(hps, key=lambda i: self.state[i].incoming)
                r.migrating, r.dst = True, dst
                self.state[dst].incoming += 1
                out.append(Escalation(r.request_id, instance_id, dst, "forced"))
        return out

    def _escalations(self, instance_id: int, now: float) -> list[Escalation]:
        if self.force_after is not None:
            return self._forced(instance_id, now)
        st = self.state[instance_id]
        margin = 1.0 + st.perf.error_quantile(ERROR_QUANTILE)
        at_risk: list[tuple[float, _Req, str]] = []
        for rid, t_first in self.predicted_first_token(instance_id, now).items():
            r = self.reqs[rid]
            # (Whether a request without tokens has begun its prefill only its worker knows; in
            # the paper's mode the migrator refuses those that have.)
            if r.ttft_slo is None or now < r.retry_after:
                continue
            # Predicted wait stretched by the model's recent error: a miss we can still avoid.
            if now >= r.ttft_deadline:
                self._judge_hopeless(r)  # served best-effort on its LP, after every hopeful prompt
            elif now + (t_first - now) * margin > r.ttft_deadline:
                at_risk.append((r.ttft_deadline, r, "ttft"))
        if self.escalate_started:
            step = self.lp_step_time(instance_id)
            # The LP scheduler keeps decodes on pace: it trims its prefill budget so that a
            # decode's steps stay within its objective, and runs decode-only steps for one that
            # fell behind. So a decode is at risk only when even decode-only steps (stretched by
            # the model's error) cannot bring its mean TBT inside the objective.
            decode_only = st.perf.step_time(0, st.decodes, st.decode_context) * margin
            capped = step * margin
            for r in self.on_instance[instance_id].values():
                slo, first, n_out = r.tbt_slo, r.first, r.n_out
                if slo is None or first is None or n_out < 2 or r.migrating or now < r.retry_after:
                    continue
                if first > r.ttft_deadline:
                    self._judge_hopeless(r)  # missed its TTFT already: moving it cannot save it
                    continue
                behind = r.last - first > slo * (n_out - 1)
                if not behind and decode_only <= slo:
                    continue  # on pace, and the LP can keep it there: never at risk (cheap exit)
                future = decode_only if behind else max(decode_only, min(capped, slo))
                projected = self.projected_mean_tbt(r, future)
                if projected is not None and projected > slo and r.max_tokens - n_out >= MIN_TOKENS_LEFT_TO_ESCALATE:
                    at_risk.append((r.last + slo, r, "tbt"))
        at_risk.sort(key=lambda x: x[0])
        out: list[Escalation] = []
        src = self.instances[instance_id]
        promoted = False
        for _, r, why in at_risk:
            dst = self._best_hp(r.prompt_tokens, r.n_out, r.max_tokens, r.ttft_deadline, r.tbt_slo, now,
                                started=r.first is not None)
            if dst is None and self.adaptive_roles and not promoted:
                promoted = True  # at most one promotion a step; it may take this request at once
                if self._maybe_promote(instance_id, now) is not None:
                    dst = self._best_hp(r.prompt_tokens, r.n_out, r.max_tokens, r.ttft_deadline, r.tbt_slo, now,
                                        started=r.first is not None)
            if dst is None:
                continue
            if _load(self.instances[dst]) + self.state[dst].incoming >= _load(src):
                continue  # the HP holds more work than this LP already: moving it there would not help
            r.migrating, r.dst = True, dst
            self.state[dst].incoming += 1
            self._last_escalated_to[dst] = now
            out.append(Escalation(r.request_id, instance_id, dst, why))
        out += self._spill_hopeless(instance_id, now)
        return out

    def _spill_hopeless(self, instance_id: int, now: float) -> list[Escalation]:
        """Move hopeless prompts still waiting on this LP to an HP instance that holds the ticket.

        When the load is beyond what the objectives allow, the LP's queue fills with requests
        that can no longer make their TTFT while the HP, kept for escalations nobody can be
        saved by, would sit idle: the split would serve less than the baselines' all-mixed
        instances. An HP with the ticket (nothing escalated queued, under half its seats used)
        takes them as best-effort work; it serves them after every request that can still meet
        its objectives, and their decodes never slow its steps down, so it keeps its headroom.
        """
        hopeless = [r for r in self.on_instance[instance_id].values()
                    if r.hopeless and r.first is None and not r.migrating and now >= r.retry_after]
        if not hopeless:
            return []
        hopeless.sort(key=lambda r: r.arrival)  # the longest waiting first, as a FCFS baseline would
        out = []
        src = self.instances[instance_id]
        for r in hopeless:
            dst = self._hp_with_ticket(r.prompt_tokens, r.max_tokens)
            # Only towards the lighter side: spilling must even the load out, not tip it over.
            if dst is None or _load(self.instances[dst]) + 1 >= _load(src):
                break
            r.migrating, r.dst = True, dst
            self.state[dst].incoming += 1
            out.append(Escalation(r.request_id, instance_id, dst, "spill"))
        return out

    def _hp_with_ticket(self, prompt: int, max_tokens: int) -> int | None:
        for inst in self.instances:
            if inst.role != "hp" or not inst.alive:
                continue
            st = self.state[inst.instance_id]
            if st.incoming or inst.num_waiting or inst.num_running >= st.max_num_seqs * TICKET_SEAT_SHARE:
                continue
            need = blocks_for(prompt + max_tokens, st.block_size)
            if inst.total_blocks and inst.free_blocks - need < HP_FREE_BLOCK_RESERVE * inst.total_blocks:
                continue
            return inst.instance_id
        return None

    def _judge_hopeless(self, r: _Req) -> None:
        if not r.hopeless:
            r.hopeless = True
            self.num_hopeless += 1

    def _best_hp(self, prompt: int, n_out: int, max_tokens: int, ttft_deadline: float, tbt_slo: float | None,
                 now: float, started: bool, new_request: bool = False, tight: bool = False) -> int | None:
        best, best_headroom = None, -math.inf
        for inst in self.instances:
            if inst.role != "hp" or not inst.alive:
                continue
            st = self.state[inst.instance_id]
            if st.incoming >= self.max_incoming:
                continue
            if tight:
                # The tight class (tighter than a looser class seen): the HP takes
                # it while nothing escalated is queued, its decodes with this one stay inside the
                # request's TBT objective and its steps have been running well inside it
                # (TIGHT_PACE_SHARE); the TTFT and block checks below still apply.
                if st.incoming or (tbt_slo is not None and (
                        st.perf.step_time(0, st.decodes + 1, st.decode_context + prompt) > tbt_slo
                        or st.step_time_avg > TIGHT_PACE_SHARE * tbt_slo)):
                    continue
            elif new_request and (st.incoming or inst.num_waiting or inst.num_running >= st.max_num_seqs * TICKET_SEAT_SHARE):
                continue  # the ticket: new work only while HP has nothing escalated queued
            need = blocks_for(min(prompt + max_tokens, prompt + n_out + ESCALATION_GROWTH_TOKENS), st.block_size)
            if inst.total_blocks and inst.free_blocks - need < HP_FREE_BLOCK_RESERVE * inst.total_blocks:
                continue
            if inst.num_running >= st.max_num_seqs:
                continue
            decodes = st.decodes + (1 if started else 0)
            step = st.perf.step_time(0 if started else min(prompt, st.chunk_size), decodes + 1, st.decode_context + prompt + n_out)
            if not started:
                # HP serves its own queue earliest-deadline-first; count all of it as ahead.
                queued = inst.unstarted_prompt_tokens + prompt
                t_first = now + math.ceil(queued / st.prefill_budget()) * step
                if t_first > ttft_deadline:
                    continue
                headroom = ttft_deadline - t_first
            else:
                if tbt_slo is not None and step > tbt_slo:
                    continue
                headroom = (tbt_slo or 1.0) - step
            if headroom > best_headroom:
                best, best_headroom = inst.instance_id, headroom
        return best

    def _incoming_done(self, r: _Req) -> None:
        if r.dst is not None:
            self.state[r.dst].incoming -= 1
            r.dst = None
