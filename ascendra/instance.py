"""One serving instance, everything but the forward pass.

Pure code (no torch, no I/O, no clock reads): the worker's engine (``workers/engine.py``) adds
the model runner and the sampler on top; the simulator's instance (``ascendra/sim/engine.py``)
adds simulated step times. Both therefore share, line for line:

- the request table and the admission checks, with their error texts;
- scheduling (the local ``Scheduler`` over a ``BlockManager``);
- the shape of a step (``BatchShape``), each scheduled item classified once as prefill or
  decode by ``ScheduledSeq.is_decode``;
- committing a step: K/V now in the pool, the sampled token appended, first/last token times,
  and the finish rules (stop ids, end of sequence, ``min_tokens``, ``max_tokens``,
  ``max_model_len``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ascendra.block_manager import BlockManager, blocks_for
from ascendra.perf_model import BatchShape
from ascendra.scheduler import PrefillTimeFn, ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput, StepTimeFn
from ascendra.sequence import Sequence


class Step:
    """One iteration as scheduled: the batch, its shape, and the rows that sample a token."""

    __slots__ = ("sched", "shape", "prefill_context_tokens", "sampling")

    def __init__(self, sched: SchedulerOutput) -> None:
        self.sched = sched
        pre = pairs = pctx = dec = dctx = 0
        for s in sched.scheduled:
            n, ctx = s.num_tokens, s.context_len
            if s.is_decode:
                dec += 1
                dctx += ctx + 1
            else:
                pre += n
                pctx += ctx + n
                pairs += n * (ctx + n)
        self.shape = BatchShape(pre, pairs, dec, dctx)
        self.prefill_context_tokens = pctx
        # Rows that reach the end of their known tokens sample one new token each, in batch order.
        self.sampling: list[ScheduledSeq] = [s for s in sched.scheduled if s.samples]

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.sched.scheduled

    @property
    def is_empty(self) -> bool:
        return not self.sched.scheduled


class Emitted:
    """What committing a step did to one sampling row: its token and, if it ended, why."""

    __slots__ = ("seq", "token", "finish_reason", "error", "first")

    def __init__(self, seq: Sequence, token: int | None, finish_reason: str | None = None,
                 error: str | None = None, first: bool = False) -> None:
        self.seq = seq
        self.token = token  # None when the row failed
        self.finish_reason = finish_reason
        self.error = error
        self.first = first  # this was the request's first token


class Instance:
    """The request table of one instance and its step bookkeeping."""

    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        *,
        vocab_size: int | None = None,
        eos_token_ids: Iterable[int] = (),
        scatter_seed: int | None = None,
        prefill_time: PrefillTimeFn | None = None,
        step_time: StepTimeFn | None = None,
    ) -> None:
        self.max_model_len = config.max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.blocks = BlockManager(num_blocks, block_size, scatter_seed)
        self.scheduler = Scheduler(config, self.blocks, prefill_time=prefill_time, step_time=step_time)
        self.requests: dict[str, Sequence] = {}

    # ---- admission
    def admission_error(self, seq: Sequence) -> str | None:
        """Why seq can never run here, or None. The texts reach the user as they are."""
        if seq.request_id in self.requests:
            return f"request id {seq.request_id!r} is already running on this worker"
        n = seq.num_tokens
        if n == 0:
            return "prompt is empty"
        if n >= self.max_model_len:
            return (f"prompt has {n} tokens; this model's limit is {self.max_model_len} "
                    "(prompt plus at least one output token)")
        if self.vocab_size is not None:
            vocab = self.vocab_size
            bad = next((t for t in seq.token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                return f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})"
        max_tokens = seq.sampling.max_tokens
        if max_tokens <= 0:
            return "max_tokens must be at least 1"
        longest = min(seq.num_prompt_tokens + max_tokens, self.max_model_len)
        need = blocks_for(longest, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            return (f"request needs up to {need} KV blocks ({longest} tokens) but this "
                    f"worker's pool holds only {self.blocks.num_blocks}")
        return None

    def add(self, seq: Sequence) -> str | None:
        """Queue a new request; returns the admission error instead when it can never run here."""
        error = self.admission_error(seq)
        if error is None:
            self.requests[seq.request_id] = seq
            self.scheduler.add(seq)
        return error

    def attach(self, seq: Sequence) -> None:
        """Take in a request another instance started; its blocks (if any) are already allocated."""
        self.requests[seq.request_id] = seq
        self.scheduler.attach(seq)

    def detach(self, request_id: str) -> Sequence | None:
        """Stop scheduling a request but keep its blocks (a migration is copying them out)."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.detach(seq)
        return seq

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out (aborted, finished, failed) and free its blocks."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
        return seq

    # ---- state
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one iteration
    def plan(self, now: float) -> Step:
        """Schedule the next iteration (an empty step when nothing can run now)."""
        return Step(self.scheduler.schedule(now))

    def complete(self, step: Step, tokens: list[int | None], now: float,
                 errors: dict[int, str] | None = None) -> list[Emitted]:
        """Commit a step that ran: ``tokens[i]`` is what sampling row i drew. A row listed in
        ``errors`` (by its index in ``step.sampling``) failed alone: that request ends with the
        error and its batch-mates go on."""
        self.scheduler.commit(step.sched, now)
        out: list[Emitted] = []
        for i, s in enumerate(step.sampling):
            seq = s.seq
            if errors and i in errors:
                self.remove(seq.request_id)
                seq.finish_reason = "error"
                out.append(Emitted(seq, None, "error", errors[i]))
                continue
            token = tokens[i]
            seq.token_ids.append(token)
            first = seq.first_token_time is None
            if first:
                seq.first_token_time = now
            seq.last_token_time = now
            reason = self.finish_reason(seq, token)
            if reason is not None:
                self.remove(seq.request_id)
                seq.finish_reason = reason
            out.append(Emitted(seq, token, reason, None, first))
        return out

    def fail(self, step: Step) -> list[Sequence]:
        """The whole step failed (the forward pass raised): every request in it ends."""
        failed = []
        for s in step.sched.scheduled:
            if self.remove(s.seq.request_id) is not None:
                s.seq.finish_reason = "error"
                failed.append(s.seq)
        return failed

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        """Why seq ends after appending token, or None. Stop ids and end-of-sequence count only
        once ``min_tokens`` outputs exist; ``max_tokens`` and the model's length always do."""
        p = seq.sampling
        n = len(seq.token_ids) - seq.num_prompt_tokens
        if n >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop"
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if n >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def abort_all(self) -> list[Sequence]:
        return [seq for rid in list(self.requests) if (seq := self.remove(rid)) is not None]
