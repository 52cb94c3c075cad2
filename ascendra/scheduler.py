"""The local batch scheduler: which requests run in the next iteration, and how many tokens each.

Pure code: no torch, no I/O, no clock reads (the caller passes ``now``). The worker and
the simulator drive this same class.

Policies (../shared/DESIGN.md, "Scheduling policies"):
- ``vllm``: prefill-first FCFS. Whole prompts while the token budget (max_model_len),
  seats and blocks allow; a batch with prefills holds no decodes. Otherwise decode all.
- ``sarathi``: decode-first and stall-free. Running decodes, then ongoing prefills, then
  new requests FCFS, chunked so the batch holds at most ``chunk_size`` tokens. No skipping.
- ``lp`` (Ascendra low priority): decode-first, then prefills in order of least TTFT
  slack (deadline - now - predicted prefill time); requests already past hope go last.
  A request that does not fit is skipped, not waited on. The prefill budget keeps every
  decode able to meet its mean TBT, letting decodes spend the slack they banked and will bank.
- ``hp`` (Ascendra high priority): the same rules; its waiting requests are mostly escalated
  ones, so least slack first is earliest deadline first.
  On both, a decode with no slack left (that can still recover) gets decode-only steps, and a
  request judged hopeless (TTFT missed, or a mean TBT no step plan can save) never holds
  anyone back: it is served best-effort, so past what the objectives allow the instance runs
  at full throughput like Sarathi instead of pacing for objectives nothing can meet.
  Options (lp/hp with a step-time model, off by default): ``max_seats`` sizes the seat count to
  the tightest TBT objective held (``seat_limit``), ``max_chunk`` lets a step prefill past
  ``chunk_size`` while every hopeful decode stays on pace.

Preemption is by recompute: when a decode needs a block and none is free, the running
request of lowest priority loses its blocks and returns to the waiting queue.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ascendra import config
from ascendra.block_manager import BlockManager
from ascendra.sequence import Sequence, SeqStatus

POLICIES = ("vllm", "sarathi", "lp", "hp")
# Deadline-sized seats: the share of the tightest TBT objective that a step of every seat
# decoding plus a full prefill chunk may take (the prediction uses the last step's mean context;
# the latency budget trims the prefill if contexts grow). 0.6 held seats back on mixed SLO
# classes in the paper scenario (72 vs 120 req/s at 0.9) and changed nothing elsewhere.
SEAT_STEP_SHARE = 0.9
# Pacing's step-time bias: the mean of actual / predicted over this many recent steps ...
BIAS_WINDOW = 64
# ... once this many are seen (before, predictions are taken as they are), each clipped to
# this range so that one stall (a GC pause, a busy host) does not throttle a minute of steps.
BIAS_MIN_STEPS = 16
BIAS_CLIP = (0.5, 2.0)
# Pacing lets a step spend this share of the slack a decode's later tokens will bank at the
# decode-only step, not all of it: spent to the last millisecond, the decode sits on the edge of
# hopeless, and one step a little longer than planned (a one-token chunk counted as a decode, a
# busy host) tips it over, after which it is served best-effort and misses by far (a decode paced
# so, 120 tokens at 20 ms TBT: 52 ms mean TBT with an exact model; 20 ms with this reserve).
PACE_BANK_SHARE = 0.9
# A step runs longer than its (bias-corrected) prediction by about the spread of actual / predicted
# from step to step. A decode paced to the edge absorbs that from the slack its later tokens bank
# beyond PACE_BANK_SHARE; near its end there is little left, so its mean TBT lands over the
# objective (the real CPU server: relaxed decodes at 0.100-0.111 s against 0.1 s, the shortest
# outputs furthest over). Pacing keeps this many spreads of the step in reserve where the decode's
# remaining reserve cannot cover them. Noisy simulator (--step-noise, 1,000 mixed-class requests,
# 8 seeds, mean capacity on three real runs' step logs): 10.81 / 11.82 / 10.73 req/s without it,
# 11.92 / 12.29 / 11.20 at 2 spreads, 12.21 / 12.22 / 11.44 at 3. Where steps run as predicted the
# spread is 0 and nothing changes (the paper scenario's capacities are the same to the printed digit).
END_MARGIN_SPREADS = 3.0

# Seconds for a prefill of n tokens, and for a whole step given (prefill tokens, decodes).
PrefillTimeFn = Callable[[int], float]
StepTimeFn = Callable[[int, int], float]


@dataclass
class SchedulerConfig:
    policy: str = "sarathi"
    max_num_seqs: int = config.default("max_num_seqs")
    chunk_size: int = config.default("chunk_size")  # token budget per step (sarathi, lp, hp)
    max_model_len: int = 2048
    # lp/hp with a step-time model: seats may grow past max_num_seqs up to this many while a step
    # of that many decodes and a full chunk stays well inside the tightest TBT objective held.
    # None: max_num_seqs is a fixed cap, as for the baselines.
    max_seats: int | None = None
    # lp/hp with a step-time model: a step's prefill budget may grow past chunk_size up to this
    # while every hopeful decode stays on pace (the latency budget). None: chunk_size is the cap.
    max_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if self.chunk_size <= 0 or self.max_num_seqs <= 0:
            raise ValueError("chunk_size and max_num_seqs must be positive")
        if self.max_seats is not None and self.max_seats < self.max_num_seqs:
            raise ValueError("max_seats must be at least max_num_seqs")
        if self.max_chunk is not None and self.max_chunk < self.chunk_size:
            raise ValueError("max_chunk must be at least chunk_size")


class ScheduledSeq:
    """One request's share of a step. A plain class with slots: the scheduler makes one per
    running request per step, and the simulator millions of them."""

    __slots__ = ("seq", "num_tokens", "context_len", "samples", "is_decode")

    def __init__(self, seq: Sequence, num_tokens: int, context_len: int) -> None:
        self.seq = seq
        self.num_tokens = num_tokens  # new tokens computed this step
        self.context_len = context_len  # tokens already in the pool before this step
        # True when this step reaches the end of the known tokens, so a new one is sampled.
        # Fixed at scheduling time: the sequence grows once the step's token is appended.
        self.samples = context_len + num_tokens == len(seq.token_ids)
        # The one prefill/decode rule (batch shape, attention path, performance model): a decode
        # computes one token against K/V already in the pool. A one-token prefill chunk after
        # cached context has exactly a decode's shape and cost, so it counts as one.
        self.is_decode = num_tokens == 1 and context_len > 0

    def __repr__(self) -> str:
        return f"ScheduledSeq({self.seq.request_id!r}, {self.num_tokens}, {self.context_len})"


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens


class StepTimeBias:
    """How much longer this instance's steps run than its model predicts: the mean ratio of
    actual to predicted time over recent steps, never below 1.

    Pacing spends a decode's TBT slack down to the objective, so a model that under-predicts
    by a few percent lands paced decodes a few percent over it (on the real CPU server, tight
    decodes finished at 30.3-30.9 ms mean TBT against a 30 ms objective). It is the mean that
    matters, not a tail quantile: a mean TBT averages over many steps, so per-step noise
    cancels while a bias adds up.
    """

    def __init__(self, window: int = BIAS_WINDOW) -> None:
        self._ratios: deque[float] = deque(maxlen=window)

    def observe(self, predicted: float, actual: float) -> None:
        if not (predicted > 0 and actual > 0):
            return
        lo, hi = BIAS_CLIP
        self._ratios.append(min(max(actual / predicted, lo), hi))

    @property
    def factor(self) -> float:
        n = len(self._ratios)
        if n < BIAS_MIN_STEPS:
            return 1.0
        return max(1.0, sum(self._ratios) / n)

    @property
    def spread(self) -> float:
        """Standard deviation of actual / predicted relative to its mean (0 until enough steps)."""
        n = len(self._ratios)
        if n < BIAS_MIN_STEPS:
            return 0.0
        mean = sum(self._ratios) / n
        return math.sqrt(sum((r - mean) ** 2 for r in self._ratios) / (n - 1)) / mean


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        prefill_time: PrefillTimeFn | None = None,
        step_time: StepTimeFn | None = None,
    ) -> None:
        self.config = config
        self.blocks = blocks
        # Without a performance model, slack is just time to the deadline.
        self.prefill_time = prefill_time or (lambda n: 0.0)
        self.step_time = step_time
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Requests judged unable to meet their objectives (served best-effort from then on).
        self.num_hopeless = 0
        self._num_decodes = 0  # decodes at the head of the batch being built
        self.bias = StepTimeBias()  # how far the step-time model under-predicts (pacing's margin)
        self._planned: tuple[float, float] | None = None  # (plan time, predicted step time)

    # ---- queue changes
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a request out (finished, aborted or moved away) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.blocks.release(seq)
        seq.status = SeqStatus.FINISHED

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling seq but keep its blocks (a migration is copying them)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def attach(self, seq: Sequence) -> None:
        """Take in a request whose blocks are already allocated (resumed or migrated in)."""
        if seq.block_table:
            self._start(seq)
        else:
            self.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one iteration
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.config.policy == "vllm":
            self._schedule_prefill_first(out)
        else:
            self._schedule_decode_first(out, now)
        if self.step_time is not None and out.scheduled and self.config.policy in ("lp", "hp"):
            decodes = out.num_decode_tokens
            self._planned = (now, self.step_time(out.num_tokens - decodes, decodes))
        return out

    def commit(self, out: SchedulerOutput, now: float | None = None) -> None:
        """Record that the scheduled tokens' K/V are now in the pool; ``now`` (when the step
        ended, on the clock ``schedule`` was given) measures the step against its prediction."""
        for s in out.scheduled:
            s.seq.num_computed_tokens = s.context_len + s.num_tokens
        if self._planned is not None and now is not None:
            started, predicted = self._planned
            self.bias.observe(predicted, now - started)
        self._planned = None

    # ---- vllm
    def _schedule_prefill_first(self, out: SchedulerOutput) -> None:
        budget = self.config.max_model_len
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_uncomputed_tokens
            if n > budget or not self.blocks.grow(seq, seq.num_tokens):
                break  # FCFS: the head waits, and so does everyone behind it
            self.waiting.pop(0)
            self._start(seq)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
        if out.scheduled:
            return
        self._schedule_decodes(out, self._fcfs_key)

    # ---- sarathi, lp, hp
    def _schedule_decode_first(self, out: SchedulerOutput, now: float) -> None:
        policy = self.config.policy
        key = self._fcfs_key if policy == "sarathi" else self._deadline_key
        self._num_decodes = self._schedule_decodes(out, key)
        budget = self.config.chunk_size - self._num_decodes
        if policy in ("lp", "hp") and self.step_time is not None and not self._overloaded(now):
            budget = self._latency_budget(out, now, budget)

        # Ongoing prefills hold blocks already: finish them before starting others.
        ongoing = [s for s in self.running if not s.is_decoding]
        ongoing.sort(key=key)
        for seq in ongoing:
            if budget <= 0:
                return
            n = min(seq.num_uncomputed_tokens, budget)
            # Blocks usually came with admission; a request migrated mid-prefill brings only
            # the blocks it had filled.
            if not self.blocks.grow(seq, seq.num_computed_tokens + n):
                continue
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n

        if policy == "sarathi":
            candidates = list(self.waiting)  # FCFS: arrival order, no skipping
            seats = self.config.max_num_seqs
        else:  # least slack first (earliest deadline, net of the prefill), the hopeless last
            candidates = sorted(self.waiting, key=lambda s: self._slack_key(s, now))
            seats = self.seat_limit() if candidates and budget > 0 else self.config.max_num_seqs
        for seq in candidates:
            if budget <= 0 or len(self.running) >= seats:
                break
            if not self.blocks.grow(seq, seq.num_tokens):
                if policy == "sarathi":
                    break
                continue  # out-of-order policies try the next request
            self.waiting.remove(seq)
            self._start(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n

    def _schedule_decodes(self, out: SchedulerOutput, key: Callable[[Sequence], float]) -> int:
        """Schedule every running decode, preempting from the low-priority end for blocks."""
        running = self.running  # _preempt edits this same list in place
        grow = self.blocks.grow
        append = out.scheduled.append
        bs = self.blocks.block_size
        decoding, short = [], 0
        for seq in running:  # is_decoding, inlined: this loop runs for every request every step
            n = len(seq.token_ids)
            if n - seq.num_computed_tokens == 1 and n > seq.num_prompt_tokens:
                decoding.append(seq)
                if n > len(seq.block_table) * bs:
                    short += 1
        if short <= self.blocks.num_free:
            # Every decode gets its block: priority order only matters when someone must yield.
            for seq in decoding:
                n = len(seq.token_ids)
                if n > len(seq.block_table) * bs:
                    grow(seq, n)
                append(ScheduledSeq(seq, 1, n - 1))
            return len(decoding)
        running.sort(key=key)
        scheduled = 0
        i = 0
        while i < len(running):
            seq = running[i]
            if not seq.is_decoding:
                i += 1
                continue
            while not grow(seq, len(seq.token_ids)):
                victim = running[-1]
                self._preempt(victim, out)
                append = out.scheduled.append  # _preempt rebuilds out.scheduled
                if victim is seq:
                    break
            else:
                append(ScheduledSeq(seq, 1, seq.num_computed_tokens))
                scheduled += 1
                i += 1
                continue
            break  # seq itself was preempted: it was the lowest priority left
        return scheduled

    def _latency_budget(self, out: SchedulerOutput, now: float, budget: int) -> int:
        """Largest prefill token count whose predicted step time keeps every hopeful decode on pace:
        at most ``budget`` (the chunk less the decodes), or with ``max_chunk`` up to that less the
        decodes, so a step far under every decode's pace prefills more than a fixed chunk would.

        A decode's next token is due at first + tbt_slo * tokens so far (that keeps its mean
        TBT inside the objective); a decode ahead of pace may spend the slack it banked, and the
        slack its later tokens will bank at the decode-only step, so the step runs longer and
        cheaper: the step may take whatever leaves the decode able to finish inside its mean TBT
        with decode-only steps. A decode with no slack left gets decode-only steps until it has.
        Only decodes that can still meet both objectives hold prefills back: one whose first
        token came after its TTFT objective has missed already, and one that could not catch up
        even with decode-only steps to its last token cannot be saved. Those are hopeless: they
        keep decoding best-effort in every step but no longer slow anyone down, so when the
        hardware cannot meet the objectives the instance runs at full throughput. A decode near its
        end, with too little reserve left to absorb a step running long by the usual spread, keeps
        END_MARGIN_SPREADS of that spread back.
        """
        top = budget if self.config.max_chunk is None else max(budget, self.config.max_chunk - self._num_decodes)
        if self.step_time is None:
            return budget
        decodes = len(out.scheduled)
        decode_only = self.step_time(0, decodes)
        # Steps are priced as they have been running, not as the model alone says (StepTimeBias).
        bias = self.bias.factor
        paced_decode_only = decode_only * bias
        overrun = END_MARGIN_SPREADS * self.bias.spread
        limit = math.inf
        for s in out.scheduled:
            seq = s.seq
            slo, first = seq.tbt_slo, seq.first_token_time
            if slo is None or first is None or seq.hopeless:  # nothing to pace
                continue
            if seq.ttft_slo is not None and first > seq.arrival_time + seq.ttft_slo:
                self._judge_hopeless(seq)  # missed its TTFT: its TBT no longer decides anything
                continue
            n_out = len(seq.token_ids) - seq.num_prompt_tokens
            allowed = first + slo * n_out - now  # seq.next_token_deadline - now, inlined
            if paced_decode_only < slo:
                # The tokens after this one can bank time again: pacing gives a decode that falls
                # behind decode-only steps, so what is left of its mean-TBT budget after them at
                # the decode-only step is what this step may take, if that is more. (Banking at
                # the typical step instead paced prefills into slivers whenever steps with a
                # prefill ran near the objective: 0.91x Sarathi on the CPU out-of-reach workload,
                # 1.0x this way, the paper scenario's capacities unchanged.)
                future = (seq.sampling.max_tokens - n_out - 1) * (slo - paced_decode_only)
                banked = future * PACE_BANK_SHARE
                allowed = max(allowed, allowed + banked)
                reserve = future - banked
            else:
                reserve = 0.0
            if overrun and allowed > 0:
                # Keep back what a step running the usual spread long would cost, beyond the reserve.
                allowed -= max(0.0, overrun * allowed - reserve)
            if allowed < slo:
                max_tokens = seq.sampling.max_tokens
                final = first + slo * max(max_tokens - 1, 1)
                if now + (max_tokens - n_out) * decode_only > final:
                    self._judge_hopeless(seq)  # holding prefills back would not save it
                    continue
            if allowed < limit:
                limit = allowed
        if math.isinf(limit):
            return top if decodes else budget  # nothing to pace; no decode, no reason to stretch a step
        # Step time grows with prefill tokens: the largest count that fits.
        return _largest_fit(0, top, lambda n: self.step_time(n, decodes) * bias <= limit)

    def seat_limit(self) -> int:
        """Most requests this instance may hold running: max_num_seqs, or with ``max_seats`` and a
        step-time model, the largest count B (up to max_seats) whose step of B decodes plus a full
        prefill chunk is predicted within SEAT_STEP_SHARE of the tightest TBT objective among the
        hopeful requests held. Steps far under the objective are seats left unused; a fixed cap
        cannot be right for both a 0.1 s and a 0.3 s objective, or short and long contexts."""
        cfg = self.config
        base, ceiling = cfg.max_num_seqs, cfg.max_seats
        if ceiling is None or ceiling <= base or self.step_time is None:
            return base
        tightest = math.inf
        for group in (self.running, self.waiting):
            for seq in group:
                t = seq.tbt_slo
                if t is not None and t < tightest and not seq.hopeless:
                    tightest = t
        if math.isinf(tightest):
            return ceiling  # no TBT objective held: seats only cost blocks
        cap = SEAT_STEP_SHARE * tightest
        chunk = cfg.chunk_size
        if self.step_time(chunk, base) > cap:
            return base  # never fewer seats than the fixed cap; pacing trims the prefill instead
        # Step time grows with decodes: the largest seat count that fits.
        return _largest_fit(base, ceiling, lambda n: self.step_time(chunk, n) <= cap)

    def _overloaded(self, now: float) -> bool:
        """A prompt waits past its TTFT deadline: this instance cannot keep up with its load.

        Then no step is paced: the queue is already losing requests, and shortening steps for
        the decodes would only lose more (each step pays the fixed per-step cost again), so the
        instance runs at full throughput, as Sarathi would, until it catches up.
        """
        for seq in self.waiting:
            if seq.ttft_deadline < now:
                return True
        return False

    def _judge_hopeless(self, seq: Sequence) -> None:
        seq.hopeless = True
        self.num_hopeless += 1

    # ---- helpers
    def _start(self, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    @staticmethod
    def _fcfs_key(seq: Sequence) -> float:
        return seq.arrival_time

    @staticmethod
    def _deadline_key(seq: Sequence) -> tuple[float, float]:
        return (seq.next_token_deadline, seq.arrival_time)

    def _slack_key(self, seq: Sequence, now: float) -> tuple[int, float, float]:
        deadline = seq.ttft_deadline
        if math.isinf(deadline):
            return (1, math.inf, seq.arrival_time)
        slack = deadline - now - self.prefill_time(seq.num_uncomputed_tokens)
        # Least slack first; requests that can no longer make it go after every hopeful one.
        return (2 if slack < 0 else 0, slack, seq.arrival_time)


def _largest_fit(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """Largest n in [lo, hi] with fits(n), for a fits that holds up to a point and no further;
    lo when none (the caller has checked lo)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
