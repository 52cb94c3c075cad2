"""The continuous-batching loop body: the instance core + model runner + sampler.

One ``step`` = plan (the core schedules), run one forward over the batch, sample, commit (the
core appends each token and finishes the requests that stop). The engine knows nothing of
sockets; the worker process wraps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ascendra import config
from ascendra.instance import Instance, Step
from ascendra.messages import AddRequest, RequestOutput, RequestState
from ascendra.scheduler import SchedulerConfig, SchedulerOutput
from ascendra.sequence import Sequence
from .device import (
    FatalDeviceError,
    StepEvent,
    is_fatal_device_error,
    timed_clock,
)
from .guided import Guides
from .kv_pool import KVPool
from .sampler import PendingLogprobs, Sampler, SamplingError, TokenLogprobs


class StepResult:
    """One iteration as it ran: the scheduled step, its outputs and its measured time."""

    def __init__(self, step: Step, outputs: list[RequestOutput], step_time: float = 0.0) -> None:
        self.step = step
        self.outputs = outputs
        self.step_time = step_time

    @property
    def sched(self) -> SchedulerOutput:
        return self.step.sched

    @property
    def num_prefill_tokens(self) -> int:
        return self.step.shape.prefill_tokens

    @property
    def prefill_attention_pairs(self) -> int:
        return self.step.shape.prefill_attention_pairs

    @property
    def num_decode_tokens(self) -> int:
        return self.step.shape.decodes

    @property
    def decode_context_tokens(self) -> int:
        return self.step.shape.decode_context

    @property
    def prefill_context_tokens(self) -> int:
        return self.step.prefill_context_tokens


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    policy: str = "sarathi"
    chunk_size: int = config.default("chunk_size")
    max_num_seqs: int = config.default("max_num_seqs")
    # lp/hp only (the baselines keep fixed caps): seats and prefill budget sized to the deadlines.
    max_seats: int | None = None
    max_chunk: int | None = None
    max_model_len: int | None = None
    scatter_seed: int | None = None  # shuffle the free list (tests)
    share_pool: bool = True


class Engine:
    """The worker's ``Instance`` core (``ascendra/instance.py``: requests, admission, scheduling,
    commit, finish rules) plus what only a worker has: the KV pool, the forward pass, sampling
    and the per-request random generators."""

    def __init__(self, runner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self.max_model_len = min(config.max_model_len or runner.max_model_len, runner.max_model_len)
        self.pool: KVPool = runner.make_pool(config.num_blocks, config.block_size, config.share_pool)
        self.core = Instance(
            SchedulerConfig(
                policy=config.policy,
                max_num_seqs=config.max_num_seqs,
                chunk_size=config.chunk_size,
                max_model_len=self.max_model_len,
                max_seats=config.max_seats if config.policy in ("lp", "hp") else None,
                max_chunk=config.max_chunk if config.policy in ("lp", "hp") else None,
            ),
            config.num_blocks,
            config.block_size,
            vocab_size=runner.vocab_size,
            eos_token_ids=runner.eos_token_ids,
            scatter_seed=config.scatter_seed,
        )
        self.blocks = self.core.blocks
        self.scheduler = self.core.scheduler
        self.requests = self.core.requests  # the core's table, read by the migration code
        self.sampler = Sampler(runner.eos_token_ids)
        self._generators: dict[str, torch.Generator] = {}
        info = getattr(runner, "info", None)
        self.guides = Guides(info.path if info is not None and not hasattr(runner, "next_tokens") else None,
                             runner.eos_token_ids)
        self.device = torch.device(getattr(runner, "device", "cpu"))
        # Recorded after each step's KV writes are queued; a migration waits on it before it
        # lets another process read blocks of this pool (see workers/migration.py).
        self.kv_written = StepEvent(self.device)
        # Test-only: request ids whose step raises a fatal device error (tools and tests
        # exercise the worker's exit path on CPU with it).
        self.fatal_request_ids: set[str] = set()

    # ---- requests in and out
    def add_request(self, req: AddRequest) -> RequestOutput | None:
        """Queue a request; returns an error output instead when it can never run here."""
        seq = self._new_sequence(req.request_id, req.prompt_token_ids, req.output_token_ids, req.sampling,
                                 req.arrival_time, req.ttft_slo, req.tbt_slo, req.first_token_time)
        error = self.core.add(seq)
        if error is not None:
            return RequestOutput(req.request_id, finish_reason="error", error=error,
                                 num_prompt_tokens=len(req.prompt_token_ids))
        self._make_generator(seq)
        return None

    def restore(self, state: RequestState, block_table: list[int]) -> Sequence:
        """Continue a request another worker started; its K/V are already in ``block_table``."""
        seq = self._new_sequence(state.request_id, state.prompt_token_ids, state.output_token_ids,
                                 state.sampling, state.arrival_time, state.ttft_slo, state.tbt_slo,
                                 state.first_token_time)
        seq.block_table = block_table
        seq.num_computed_tokens = state.num_computed_tokens
        self.core.attach(seq)
        self._make_generator(seq, state.rng_state)
        return seq

    @staticmethod
    def _new_sequence(rid, prompt, outputs, sampling, arrival, ttft_slo, tbt_slo, first_token_time) -> Sequence:
        seq = Sequence(rid, prompt, sampling, arrival, ttft_slo, tbt_slo)
        seq.token_ids.extend(outputs)
        seq.first_token_time = first_token_time
        return seq

    def _make_generator(self, seq: Sequence, rng_state: bytes = b"") -> None:
        """Seeded sampling draws from the request's own generator (moved with it on escalation)."""
        if seq.sampling.seed is None:
            return
        g = torch.Generator(device=self.runner.device)
        if rng_state:
            g.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))
        else:
            g.manual_seed(seq.sampling.seed)
        self._generators[seq.request_id] = g

    def generator(self, request_id: str) -> torch.Generator | None:
        return self._generators.get(request_id)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self.guides.forget(request_id)

    def abort(self, request_id: str) -> RequestOutput | None:
        if self.core.remove(request_id) is None:
            return None
        self.forget(request_id)
        return RequestOutput(request_id, finish_reason="abort")

    def has_work(self) -> bool:
        return self.core.has_work()

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    # ---- one iteration
    def step(self, now: float | None = None) -> StepResult:
        step = self.core.plan(time.monotonic() if now is None else now)
        result = StepResult(step, [])
        if step.is_empty:
            return result
        start = timed_clock(self.device)
        try:
            tokens, logprobs = self._forward(step)
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise  # the device is unusable: the worker exits and the coordinator marks it down
            # A failure of the forward itself cannot be pinned on one request: fail this batch.
            self.kv_written.record()
            error = f"model step failed: {type(exc).__name__}: {exc}"
            for seq in self.core.fail(step):
                self.forget(seq.request_id)
                result.outputs.append(RequestOutput(seq.request_id, finish_reason="error", error=error,
                                                    num_prompt_tokens=seq.num_prompt_tokens))
            result.step_time = timed_clock(self.device) - start
            return result
        self.kv_written.record()
        # Sampling ended in a device -> host copy, but a step that samples nothing did not:
        # the clock waits for the device, so step times measure execution, not launch.
        result.step_time = timed_clock(self.device) - start
        # A row whose sampling failed ends alone; its batch-mates go on.
        errors = {i: str(t) for i, t in enumerate(tokens) if isinstance(t, SamplingError)}
        # complete() answers one Emitted per sampling row, in row order.
        for row, e in enumerate(self.core.complete(step, tokens, time.monotonic(), errors)):
            seq = e.seq
            if e.finish_reason is not None:
                self.forget(seq.request_id)
            lp = logprobs.get(row) if logprobs and e.token is not None else None
            reported = {} if lp is None else {"logprobs": [lp.logprob], "top_token_ids": lp.top_ids,
                                              "top_logprobs": lp.top_logprobs}
            result.outputs.append(RequestOutput(
                seq.request_id, [] if e.token is None else [e.token], finish_reason=e.finish_reason,
                error=e.error, num_prompt_tokens=seq.num_prompt_tokens, **reported))
        return result

    @torch.inference_mode()
    def _forward(self, step: Step) -> tuple[list[int | SamplingError], dict[int, TokenLogprobs] | None]:
        """The sampled token of each sampling row, and the logprob reports of the rows that asked."""
        batch = step.scheduled
        sampling = step.sampling
        for s in batch:
            if s.seq.request_id in self.fatal_request_ids or "*" in self.fatal_request_ids:
                raise FatalDeviceError("CUDA error: an illegal memory access was encountered (injected)")
        params = [s.seq.sampling for s in sampling]
        if hasattr(self.runner, "next_tokens"):  # the fake model picks tokens without logits
            tokens: list[int | SamplingError] = list(self.runner.next_tokens(sampling))
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    tokens[i] = SamplingError("logprobs need a real model; the fake model has no logits")
                elif p.guided_regex is not None:
                    tokens[i] = SamplingError("structured output needs a real model; the fake model has no logits")
            return tokens, None
        logits = self.runner.execute(batch, self.pool)
        pending = PendingLogprobs.capture(logits, params)  # before the sampler edits the logits
        guided = [(i, s.seq) for i, s in enumerate(sampling) if s.seq.sampling.guided_regex is not None]
        guide_errors = self.guides.mask(logits, guided) if guided else {}
        tokens = self.sampler.sample(
            logits,
            params,
            [s.seq.num_output_tokens for s in sampling],
            [self._generators.get(s.seq.request_id) for s in sampling],
            [s.seq.request_id for s in sampling],
            [(s.seq.token_ids, s.seq.num_prompt_tokens) for s in sampling],
        )
        for i, seq in guided:
            error = guide_errors.get(i)
            if error is None and not isinstance(tokens[i], SamplingError):
                error = self.guides.advance(seq, tokens[i])
            if error is not None:
                tokens[i] = SamplingError(str(error))
        return tokens, pending.resolve(tokens) if pending is not None else None

    def close(self) -> None:
        self.core.abort_all()
        self._generators.clear()
        self.guides.clear()
        self.pool.close()
