"""The continuous-batching loop body: scheduler + block manager + model runner + sampler.

One ``step`` = schedule, run one forward over the batch, sample, advance each request,
finish the ones that stop. The engine knows nothing of sockets; the worker process wraps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ascendra.block_manager import BlockManager, blocks_for
from ascendra.messages import AddRequest, RequestOutput, RequestState
from ascendra.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ascendra.sequence import Sequence
from workers.device import (
    FatalDeviceError,
    StepEvent,
    is_fatal_device_error,
    timed_clock,
)
from workers.kv_pool import KVPool
from workers.sampler import Sampler, SamplingError


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    sched: SchedulerOutput
    step_time: float
    prefill_context_tokens: int = 0
    decode_context_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    prefill_attention_pairs: int = 0


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    policy: str = "sarathi"
    chunk_size: int = 512
    max_num_seqs: int = 128
    max_model_len: int | None = None
    scatter_seed: int | None = None  # shuffle the free list (tests)
    share_pool: bool = True


class Engine:
    def __init__(self, runner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self.max_model_len = min(config.max_model_len or runner.max_model_len, runner.max_model_len)
        self.pool: KVPool = runner.make_pool(config.num_blocks, config.block_size, config.share_pool)
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.scatter_seed)
        self.scheduler = Scheduler(
            SchedulerConfig(
                policy=config.policy,
                max_num_seqs=config.max_num_seqs,
                chunk_size=config.chunk_size,
                max_model_len=self.max_model_len,
            ),
            self.blocks,
        )
        self.sampler = Sampler(runner.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator] = {}
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
        error = self._check(req)
        if error is not None:
            return RequestOutput(req.request_id, finish_reason="error", error=error,
                                 num_prompt_tokens=len(req.prompt_token_ids))
        seq = self._new_sequence(req.request_id, req.prompt_token_ids, req.output_token_ids, req.sampling,
                                 req.arrival_time, req.ttft_slo, req.tbt_slo, req.first_token_time)
        self.scheduler.add(seq)
        return None

    def restore(self, state: RequestState, block_table: list[int]) -> Sequence:
        """Continue a request another worker started; its K/V are already in ``block_table``."""
        seq = self._new_sequence(state.request_id, state.prompt_token_ids, state.output_token_ids,
                                 state.sampling, state.arrival_time, state.ttft_slo, state.tbt_slo,
                                 state.first_token_time, state.rng_state)
        seq.block_table = block_table
        seq.num_computed_tokens = state.num_computed_tokens
        self.scheduler.attach(seq)
        return seq

    def _new_sequence(self, rid, prompt, outputs, sampling, arrival, ttft_slo, tbt_slo,
                      first_token_time, rng_state: bytes = b"") -> Sequence:
        seq = Sequence(rid, prompt, sampling, arrival, ttft_slo, tbt_slo)
        seq.token_ids.extend(outputs)
        seq.first_token_time = first_token_time
        if sampling.seed is not None:
            g = torch.Generator(device=self.runner.device)
            if rng_state:
                g.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))
            else:
                g.manual_seed(sampling.seed)
            self._generators[rid] = g
        self.requests[rid] = seq
        return seq

    def generator(self, request_id: str) -> torch.Generator | None:
        return self._generators.get(request_id)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _check(self, req: AddRequest) -> str | None:
        n = len(req.prompt_token_ids) + len(req.output_token_ids)
        if req.request_id in self.requests:
            return f"request id {req.request_id!r} is already running on this worker"
        if n == 0:
            return "prompt is empty"
        if n >= self.max_model_len:
            return (f"prompt has {n} tokens; this model's limit is {self.max_model_len} "
                    "(prompt plus at least one output token)")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            return f"prompt token id {bad[0]} is outside the vocabulary (0..{self.runner.vocab_size - 1})"
        if req.sampling.max_tokens <= 0:
            return "max_tokens must be at least 1"
        longest = min(len(req.prompt_token_ids) + req.sampling.max_tokens, self.max_model_len)
        need = blocks_for(longest, self.config.block_size)
        if need > self.config.num_blocks:
            return (f"request needs up to {need} KV blocks ({longest} tokens) but this "
                    f"worker's pool holds only {self.config.num_blocks}")
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        self._generators.pop(request_id, None)
        return RequestOutput(request_id, finish_reason="abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one iteration
    def step(self, now: float | None = None) -> StepResult:
        sched = self.scheduler.schedule(time.monotonic() if now is None else now)
        result = StepResult(outputs=[], sched=sched, step_time=0.0)
        if sched.is_empty:
            return result
        for s in sched.scheduled:
            if s.num_tokens == 1 and s.context_len > 0:
                result.num_decode_tokens += 1
                result.decode_context_tokens += s.context_len + 1
            else:
                result.num_prefill_tokens += s.num_tokens
                result.prefill_context_tokens += s.context_len + s.num_tokens
                result.prefill_attention_pairs += s.num_tokens * (s.context_len + s.num_tokens)
        start = timed_clock(self.device)
        try:
            tokens = self._forward(sched)
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise  # the device is unusable: the worker exits and the coordinator marks it down
            # A failure of the forward itself cannot be pinned on one request: fail this batch.
            self.kv_written.record()
            for s in sched.scheduled:
                self.requests.pop(s.seq.request_id, None)
                self._generators.pop(s.seq.request_id, None)
                self.scheduler.remove(s.seq)
                result.outputs.append(RequestOutput(
                    s.seq.request_id, finish_reason="error", error=f"model step failed: {type(exc).__name__}: {exc}"))
            result.step_time = timed_clock(self.device) - start
            return result
        self.kv_written.record()
        # Sampling ended in a device -> host copy, but a step that samples nothing did not:
        # the clock waits for the device, so step times measure execution, not launch.
        result.step_time = timed_clock(self.device) - start
        self.scheduler.commit(sched)
        done = time.monotonic()
        sampled = iter(tokens)
        for s in sched.scheduled:
            if not s.samples:
                continue
            seq = s.seq
            token = next(sampled)
            if isinstance(token, SamplingError):  # this request alone fails
                self.requests.pop(seq.request_id, None)
                self._generators.pop(seq.request_id, None)
                self.scheduler.remove(seq)
                result.outputs.append(RequestOutput(seq.request_id, finish_reason="error", error=str(token),
                                                    num_prompt_tokens=seq.num_prompt_tokens))
                continue
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = done
            seq.last_token_time = done
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.requests.pop(seq.request_id, None)
                self._generators.pop(seq.request_id, None)
                self.scheduler.remove(seq)
            result.outputs.append(RequestOutput(
                seq.request_id, [token], finish_reason=reason,
                num_prompt_tokens=seq.num_prompt_tokens))
        return result

    @torch.inference_mode()
    def _forward(self, sched: SchedulerOutput) -> list[int | SamplingError]:
        batch = sched.scheduled
        sampling = [s for s in batch if s.samples]
        for s in batch:
            if s.seq.request_id in self.fatal_request_ids or "*" in self.fatal_request_ids:
                raise FatalDeviceError("CUDA error: an illegal memory access was encountered (injected)")
        if hasattr(self.runner, "next_tokens"):  # the fake model picks tokens without logits
            return self.runner.next_tokens(sampling)
        logits = self.runner.execute(batch, self.pool)
        return self.sampler.sample(
            logits,
            [s.seq.sampling for s in sampling],
            [s.seq.num_output_tokens for s in sampling],
            [self._generators.get(s.seq.request_id) for s in sampling],
            [s.seq.request_id for s in sampling],
            [(s.seq.token_ids, s.seq.num_prompt_tokens) for s in sampling],
        )

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.sampling
        n = seq.num_output_tokens
        if n >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop"
            if not p.ignore_eos and token in self.runner.eos_token_ids:
                return "stop"
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self.pool.close()
