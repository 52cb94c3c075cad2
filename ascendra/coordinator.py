"""The coordinator's request lifecycle: submit, worker steps, emit, abort, drain.

Worker processes and the socket to them belong to ``ascendra.supervisor``; metric updates to
``ascendra.recorder``; one request's client-side state to ``ascendra.served_request``. Worker
output arrives as one ``StepOutput`` per iteration; ``on_step`` turns it into text and SSE
bytes for each request and wakes that request's HTTP handler once per batch of messages, so
the handler writes everything that accumulated in one go.

A request lives in ``self.requests`` from dispatch until its worker reports it finished
(including the acknowledgement of an abort), so the router's view of each instance's
load stays true. What the client sees can end earlier: a matched stop string or a
disconnect ends the client side at once and aborts the worker side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import msgspec

from ascendra import config as serving_config
from ascendra import messages as m
from ascendra.config import ServingConfig
from ascendra.detokenizer import DetokenizerFactory
from ascendra.metrics import ServerMetrics
from ascendra.migrator import MigrationResult, Migrator
from ascendra.policies import make_policy
from ascendra.protocol import APIError, ChunkWriter
from ascendra.recorder import MetricsRecorder
from ascendra.router import Policy, RouteRequest, plan_instances
from ascendra.served_request import OutputOptions, ServedRequest, unavailable
from ascendra.token_log import TokenLog
from ascendra.defaults import default_policy
from ascendra.layout import sibling_package
from ascendra.supervisor import StartupError, WorkerHandle, WorkerSupervisor, expand_devices

log = logging.getLogger("ascendra.coordinator")

# `python -m workers` from a checkout, `python -m ascendra.workers` from an installed distribution.
WORKERS_MODULE = sibling_package("workers")


def cpu_worker_threads(cpus: int, num_workers: int) -> int:
    """Torch threads per CPU worker: the cores split between workers, less one kept for this
    process (HTTP, tokenizer, detokenizer) on machines with four cores or more, as vLLM's CPU
    backend keeps one. An OpenMP thread sharing its core with another busy process stalls each
    parallel region at its barrier (on 2 cores, two workers of 2 threads each ran SmolLM2's
    decode ~4x slower than of 1 each), so workers never oversubscribe the cores. On 2 cores
    one worker still takes both: the coordinator's work is light, and 2 threads served
    SmolLM2 at 1.77x the output tokens/s of 1 (251.6 vs 142.5 at rate inf, 256 in / 64 out)."""
    spare = 1 if cpus >= 4 else 0
    return max(1, (cpus - spare) // num_workers)


class Coordinator:
    """Routes requests to workers through the policy and serves their output to the clients."""

    def __init__(self, config: ServingConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.detok_factory = DetokenizerFactory(tokenizer)
        self.metrics = ServerMetrics()
        self.record = MetricsRecorder(self.metrics)
        devices = expand_devices(config.device, config.num_instances)
        policy_name = config.policy or default_policy(len(devices))  # None: the default for this many
        self.specs = plan_instances(policy_name, len(devices), config.num_hp)
        self.policy: Policy = make_policy(policy_name, self.specs, escalate_started=config.escalate_started,
                                          class_routing=config.class_routing,
                                          force_escalation_after=config.force_escalation_after)
        self.requests: dict[str, ServedRequest] = {}
        self._frozen_since: dict[str, float] = {}  # escalated while decoding: frozen at, until its next token
        self.num_unstarted = 0  # admitted requests without a first token (the bounded queue)
        self.model_info: m.ModelInfo | None = None
        self.accepting = False
        self._step_log = None
        if config.step_log:
            try:  # unbuffered: a line per step is cheap next to the step, and readers see it at once
                self._step_log = open(config.step_log, "ab", buffering=0)
            except OSError as e:
                raise StartupError(f"cannot open --step-log {config.step_log}: {e.strerror}") from e
        self.supervisor = WorkerSupervisor(self.specs, devices, self, self.metrics.worker_messages_dropped)
        self.workers = self.supervisor.workers
        self._send = self.supervisor.send
        self.migrator = Migrator(self._send, allow_kv=config.escalate_started)

    # ------------------------------------------------------------ startup

    def worker_command(self, w: WorkerHandle) -> list[str]:
        """The worker's argv: the serving configuration, encoded once, and what is its own."""
        c = self.config
        cmd = [
            sys.executable, "-m", WORKERS_MODULE,
            "--config", serving_config.encode(c),
            "--coordinator", self.supervisor.address,
            "--worker-id", str(w.worker_id),
            "--device", w.device,
            "--role", w.spec.role,
            "--policy", w.spec.policy,
            "--parent-pid", str(os.getpid()),
        ]
        if w.device == "cpu" and not c.fake_model:
            threads = c.worker_threads or cpu_worker_threads(os.cpu_count() or 1, len(self.workers))
            cmd += ["--threads", str(threads)]
        if w.device.startswith("cuda"):
            share = sum(o.device == w.device for o in self.workers)
            cmd += ["--device-share", str(share), "--num-peers", str(len(self.workers) - 1)]
        return cmd + list(c.worker_args)

    async def start(self) -> None:
        """Spawn the workers and wait until every one has registered."""
        await self.supervisor.start(self.worker_command, self.config.startup_timeout)
        self.accepting = True
        info = self.model_info
        assert info is not None
        log.info("all %d workers registered; model %s, max_model_len %d", len(self.workers), info.name,
                 info.max_model_len)

    # ------------------------------------------------------------ worker events (from the supervisor)

    def on_registered(self, w: WorkerHandle, msg: m.Register) -> None:
        self.policy.set_alive(w.worker_id, True)
        self.record.worker_up(w.worker_id, w.spec.role)
        if self.model_info is None:
            self.model_info = msg.model
        self.policy.configure_instance(w.worker_id, list(msg.perf_model), msg.chunk_size, msg.max_num_seqs,
                                       msg.block_size)

    def on_worker_down(self, w: WorkerHandle, reason: str) -> None:
        """Fail the worker's requests and stop routing to it; the others keep serving."""
        if w.alive:
            log.error("%s; failing %d in-flight request(s)", reason, len(w.requests))
        w.alive = False
        self.policy.set_alive(w.worker_id, False)
        self.record.worker_down(w.worker_id, w.spec.role)
        err = unavailable(reason)
        for rid in list(w.requests):
            st = self.requests.pop(rid, None)
            if st is None:
                continue
            self._release(st)
            if not st.client_done:
                self.record.end(st, "error", time.monotonic())
                st.fail(err)
        w.requests.clear()
        for res in self.migrator.on_worker_down(w.worker_id):
            self._migration_ended(res, time.monotonic())

    def _log_step(self, step: m.StepOutput, now: float) -> None:
        try:
            self._step_log.write(_STEP_LOG_ENCODER.encode(
                {"worker": step.worker_id, "prefill": step.num_prefill_tokens, "pairs": step.prefill_attention_pairs,
                 "decode": step.num_decode_tokens, "decode_context": step.decode_context_tokens,
                 "step_time": step.step_time, "end": step.time, "received": now,
                 "running": step.num_running, "waiting": step.num_waiting}) + b"\n")
        except OSError as e:  # a full disk must not stop tokens reaching clients
            log.error("step log disabled: %s", e)
            self._step_log.close()
            self._step_log = None

    def on_step(self, step: m.StepOutput, now: float) -> None:
        wid = step.worker_id
        if self._step_log is not None and step.num_seqs:
            self._log_step(step, now)
        policy = self.policy
        record = self.record
        record.step(step, policy.step_time_model(wid))
        frozen = self._frozen_since
        requests = self.requests
        gen_tokens = 0
        for out in step.outputs:
            st = requests.get(out.request_id)
            if st is None:
                continue
            ids = out.new_token_ids
            if ids:
                n = len(ids)
                gen_tokens += n
                st.num_tokens += n
                first = st.first_token_time is None
                record.tokens(st, n, now, first)
                if first:
                    st.first_token_time = now
                    self.num_unstarted -= 1
                    policy.on_first_token(st.request_id)
                    self.migrator.on_first_token(st.request_id)
                st.last_token_time = now
                policy.on_tokens(st.request_id, n, now)
                if frozen and st.request_id in frozen:
                    record.downtime(now - frozen.pop(st.request_id))
                if st.client_done:
                    text = ""
                else:
                    if st.log is not None:
                        st.log.add(out)
                    # A stop token (EOS, stop_token_ids) ends the request; its text is left out
                    # unless include_stop_str_in_output asks for it (vLLM's rule).
                    if out.finish_reason == "stop" and not st.options.include_stop_str:
                        ids = ids[:-1]
                    text = st.detok.feed(ids) if ids else ""
            else:
                text = ""
            if out.finish_reason is None:
                if text or (st.log is not None and st.log.pending and not st.client_done):
                    self._emit(st, text, now)
            else:
                requests.pop(out.request_id, None)
                self._release(st)
                if not st.client_done:
                    self._end_from_worker(st, out, text, now)
        if gen_tokens:
            record.generated(gen_tokens)
        # The policy judges the step after hearing its tokens, so that a prompt whose prefill
        # just finished is not escalated for a first token it already has.
        for esc in policy.on_step(wid, step):
            if esc.request_id in self.requests and self.migrator.start(esc, now) is not None:
                log.info("escalating %s from instance %d to %d (%s)", esc.request_id, esc.src, esc.dst, esc.reason)
            else:
                policy.on_migration_failed(esc.request_id, now)
        for up in step.migrations:
            res = self.migrator.on_update(wid, up, now)
            if res is not None:
                self._migration_ended(res, now)

    # ------------------------------------------------------------ escalation

    def _migration_ended(self, res: MigrationResult, now: float) -> None:
        mig = res.migration
        rid = mig.request_id
        st = self.requests.get(rid)
        if not mig.ok:
            self.policy.on_migration_failed(rid, now)
            self.record.escalation_failed(mig.error)
            log.info("escalation of %s abandoned: %s", rid, mig.error)
            return
        if st is None:  # ended meanwhile: make sure the destination holds nothing for it
            if mig.kind == "kv":
                self._send(mig.dst, m.AbortRequests([rid]))
            return
        if res.moved_state is not None:
            s0 = res.moved_state
            add = m.AddRequest(rid, s0.prompt_token_ids, s0.sampling, s0.arrival_time, s0.ttft_slo, s0.tbt_slo,
                               output_token_ids=s0.output_token_ids, first_token_time=s0.first_token_time)
            if not self._send(mig.dst, add):
                self.policy.on_migration_failed(rid, now)
                self._fail_request(st, unavailable(f"instance {mig.dst} is gone"))
                return
            stage = "waiting"
        else:
            stage = "decode" if mig.tokens_at_freeze > 0 else "prefill"
        self.workers[mig.src].requests.discard(rid)
        self.workers[mig.dst].requests.add(rid)
        st.instance_id = mig.dst
        self.policy.on_migrated(rid, mig.dst, now)
        src = self.workers[mig.src].register
        self.record.escalated(stage, mig.blocks_copied, src.bytes_per_block if src else 0)
        if mig.frozen_at is not None:
            if stage == "decode":
                self._frozen_since[rid] = mig.frozen_at
            else:
                self.record.downtime(now - mig.frozen_at)
        log.info("escalated %s (%s) to instance %d: %d blocks, frozen %.1f ms", rid, stage, mig.dst,
                 mig.blocks_copied, (now - mig.frozen_at) * 1e3 if mig.frozen_at else 0.0)

    # ------------------------------------------------------------ one request's end

    def _fail_request(self, st: ServedRequest, err: APIError) -> None:
        """End a request on both sides with an error (its worker cannot serve it any more)."""
        self.requests.pop(st.request_id, None)
        self._release(st)
        if not st.client_done:
            self.record.end(st, "error", time.monotonic())
            st.fail(err)

    def _abort_on_workers(self, st: ServedRequest) -> None:
        """Abort on the request's worker, and on both ends of a migration in flight."""
        targets = {st.instance_id}
        mig = self.migrator.drop(st.request_id)
        if mig is not None:
            targets |= {mig.src, mig.dst}
            self.policy.on_migration_failed(st.request_id, time.monotonic())
        self._frozen_since.pop(st.request_id, None)
        for wid in targets:
            self._send(wid, m.AbortRequests([st.request_id]))

    def _emit(self, st: ServedRequest, text: str, now: float) -> None:
        """Pass new text through the stop matcher to the client; a match ends the request."""
        if st.stop is not None and st.num_tokens >= st.min_tokens:
            text, matched = st.stop.feed(text)
            if matched:
                self.record.end(st, "stop", now)
                st.finish("stop", text)
                self._abort_on_workers(st)
                return
        if text or st.log is not None:
            st.push(text)

    def _end_from_worker(self, st: ServedRequest, out: m.RequestOutput, text: str, now: float) -> None:
        reason = out.finish_reason
        if reason in ("stop", "length"):
            text += st.detok.flush()
            if st.stop is not None and st.num_tokens >= st.min_tokens:
                text, matched = st.stop.feed(text)
                if matched:
                    reason = "stop"
                else:
                    text += st.stop.flush()
            self.record.end(st, reason, now)
            st.finish(reason, text)
        elif reason == "abort":
            self.record.end(st, "abort", now)
            st.finish("abort", text)
        else:
            # The worker's text may carry an exception repr: it goes to the log, not to the client.
            log.warning("worker %d failed request %s: %s", st.instance_id, st.request_id, out.error)
            self.record.end(st, "error", now)
            st.fail(APIError(f"The worker failed while serving request {st.request_id}; the server log has the "
                             "details.", status=500, type="internal_server_error", code=500))

    def _release(self, st: ServedRequest) -> None:
        """Forget a request on the worker side (it holds no blocks any more)."""
        if st.first_token_time is None:
            self.num_unstarted -= 1
        self.policy.on_finish(st.request_id)
        if 0 <= st.instance_id < len(self.workers):
            self.workers[st.instance_id].requests.discard(st.request_id)

    # ------------------------------------------------------------ requests

    def new_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: m.SamplingParams,
        arrival: float,
        stops: list[str],
        chunks: ChunkWriter | None,
        include_usage: bool = False,
        ttft_slo: float | None = None,
        tbt_slo: float | None = None,
        options: OutputOptions | None = None,
    ) -> ServedRequest:
        options = options or OutputOptions()
        log = None
        if options.return_token_ids or sampling.logprobs is not None:
            log = TokenLog(options.return_token_ids, sampling.logprobs, options.chat, self.detok_factory.piece,
                           options.tokens_as_ids)
        return ServedRequest(
            request_id, prompt_ids, sampling, arrival,
            ttft_slo if ttft_slo is not None else self.config.ttft_slo,
            tbt_slo if tbt_slo is not None else self.config.tbt_slo,
            self.detok_factory.new(prompt_ids, options.skip_special_tokens), stops, chunks, include_usage,
            options, log,
        )

    def submit(self, st: ServedRequest) -> None:
        """Route and dispatch, or raise APIError (429 queue full or predicted to miss, 503 no worker /
        shutting down)."""
        if not self.accepting:
            self.record.rejected("no_worker")
            raise unavailable("The server is shutting down.")
        if self.num_unstarted >= self.config.max_waiting:
            self.record.rejected("queue_full")
            raise APIError(
                f"Too many requests waiting ({self.num_unstarted} >= --max-waiting {self.config.max_waiting}); retry later.",
                status=429, type="rate_limit_error", code=429,
            )
        route = RouteRequest(st.request_id, len(st.prompt_ids), st.sampling.max_tokens, st.arrival, st.ttft_slo, st.tbt_slo)
        if self.config.admission and self.policy.would_miss(route):
            self.record.refused_would_miss()
            raise APIError(
                f"No instance can give this request its first token within its TTFT objective ({st.ttft_slo:g} s) "
                "under the current load (--admission); retry later.",
                status=429, type="rate_limit_error", code=429,
            )
        wid = self.policy.route(route)
        if wid is None:
            self.record.rejected("no_worker")
            raise unavailable("No live worker can take the request.")
        msg = m.AddRequest(
            request_id=st.request_id,
            prompt_token_ids=st.prompt_ids,
            sampling=st.sampling,
            arrival_time=st.arrival,
            ttft_slo=st.ttft_slo,
            tbt_slo=st.tbt_slo,
        )
        if not self._send(wid, msg):
            raise unavailable("The chosen worker is gone; retry.")
        st.instance_id = wid
        st.dispatch_time = time.monotonic()
        self.record.dispatched(st)
        self.requests[st.request_id] = st
        self.workers[wid].requests.add(st.request_id)
        self.policy.on_dispatch(wid, route)
        self.num_unstarted += 1

    def abort(self, st: ServedRequest, reason: str = "client disconnected") -> None:
        """The client went away: end its side and free the request's blocks on the worker."""
        if st.client_done:
            return
        self.record.end(st, "abort", time.monotonic())
        st.close_aborted()
        if st.request_id in self.requests:
            self._abort_on_workers(st)
        log.debug("aborted %s: %s", st.request_id, reason)

    # ------------------------------------------------------------ status

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens the smallest live worker's KV pool can hold (None before registration)."""
        caps = [w.register.num_blocks * w.register.block_size for w in self.workers
                if w.register is not None and w.alive]
        return min(caps) if caps else None

    @property
    def healthy(self) -> bool:
        return all(w.alive for w in self.workers)

    def health(self) -> dict[str, Any]:
        """What a client or load balancer needs; pids and failure texts stay in the log and /metrics."""
        return {
            "status": "ok" if self.healthy else "degraded",
            "requests_inflight": len(self.requests),
            "requests_waiting": self.num_unstarted,
            "workers": [
                {"id": w.worker_id, "role": w.spec.role, "alive": w.alive, "num_requests": len(w.requests)}
                for w in self.workers
            ],
        }

    def render_metrics(self) -> str:
        return self.record.render(len(self.requests), self.num_unstarted, self.policy.num_hopeless)

    # ------------------------------------------------------------ shutdown

    async def drain(self, timeout: float) -> None:
        """Stop admitting; give in-flight requests up to ``timeout`` seconds, then end them."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while any(not st.client_done for st in self.requests.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        err = unavailable("The server is shutting down.")
        for st in list(self.requests.values()):
            if not st.client_done:
                self.record.end(st, "abort", time.monotonic())
                st.fail(err)
            self._abort_on_workers(st)

    async def shutdown(self) -> None:
        """Stop the workers (the supervisor), then close what the lifecycle opened."""
        self.accepting = False
        await self.supervisor.shutdown(self.config.shutdown_timeout)
        if self._step_log is not None:
            self._step_log.close()


_STEP_LOG_ENCODER = msgspec.json.Encoder()

__all__ = ["Coordinator", "StartupError"]
