"""Metrics recording: what the coordinator's events mean for ``ServerMetrics``.

The coordinator calls one method per event (a worker up or down, a step, tokens, an end, an
escalation); this module decides which series move. Updates are plain attribute writes, so
the per-token cost stays small.
"""

from __future__ import annotations

import time

from ascendra import messages as m
from ascendra.metrics import ServerMetrics
from ascendra.perf_model import BatchShape, PerfModel
from ascendra.served_request import ServedRequest


class MetricsRecorder:
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._worker_hopeless: dict[int, int] = {}  # each worker scheduler's running count

    # ---- workers

    def worker_up(self, wid: int, role: str) -> None:
        mt, label = self.metrics, str(wid)
        mt.worker_up.set(1, label, role)
        mt.kv_usage.set(0.0, label)
        mt.running.set(0, label)
        mt.waiting.set(0, label)

    def worker_down(self, wid: int, role: str) -> None:
        mt, label = self.metrics, str(wid)
        mt.worker_up.set(0, label, role)
        # A dead worker holds nothing: its last step's gauges must not linger.
        for gauge in (mt.kv_usage, mt.running, mt.waiting, mt.preempted):
            gauge.set(0, label)

    def step(self, step: m.StepOutput, model: PerfModel | None) -> None:
        """A worker's step: its gauges, its hopeless count, and how far off the step-time model was."""
        mt, label = self.metrics, (str(step.worker_id),)
        mt.running.values[label] = step.num_running
        mt.waiting.values[label] = step.num_waiting
        mt.preempted.values[label] = step.num_preempted
        mt.kv_usage.values[label] = (1.0 - step.free_blocks / step.total_blocks) if step.total_blocks else 0.0
        self._worker_hopeless[step.worker_id] = step.num_hopeless
        if model is not None and step.num_seqs and step.step_time > 0 and model.fitted:
            shape = BatchShape(step.num_prefill_tokens, step.prefill_attention_pairs, step.num_decode_tokens,
                               step.decode_context_tokens)
            mt.step_time_error.observe(abs(model.predict(shape) - step.step_time) / step.step_time)

    # ---- requests

    def dispatched(self, st: ServedRequest) -> None:
        self.metrics.queue.observe(st.dispatch_time - st.arrival)

    def tokens(self, st: ServedRequest, n: int, now: float, first: bool) -> None:
        """n tokens reached the coordinator together at ``now`` (st.last_token_time is the previous batch)."""
        mt = self.metrics
        if first:
            mt.ttft.observe(now - st.arrival)
            mt.prompt_tokens.inc(len(st.prompt_ids))
        else:
            mt.itl.observe(now - st.last_token_time)
        if n > 1:  # tokens that arrived together are 0 s apart
            mt.itl.observe_many(0.0, n - 1)

    def generated(self, n: int) -> None:
        v = self.metrics.generation_tokens.values
        v[()] = v.get((), 0.0) + n

    def rejected(self, reason: str) -> None:
        self.metrics.rejected.inc(1, reason)

    def end(self, st: ServedRequest, reason: str, now: float) -> None:
        """The client side ended: its finish reason, and whether it met its objectives."""
        mt = self.metrics
        mt.success.inc(1, reason)
        if reason == "abort":
            return
        if reason == "error":
            mt.slo.inc(1, "failed")
            return
        mt.e2e.observe(now - st.arrival)
        ttft = (st.first_token_time if st.first_token_time is not None else now) - st.arrival
        tbt = 0.0
        if st.num_tokens > 1 and st.first_token_time is not None:
            tbt = (st.last_token_time - st.first_token_time) / (st.num_tokens - 1)
            mt.mean_tbt.observe(tbt)
        if st.ttft_slo is not None and ttft > st.ttft_slo:
            mt.slo.inc(1, "missed_ttft")
        elif st.tbt_slo is not None and tbt > st.tbt_slo:
            mt.slo.inc(1, "missed_tbt")
        else:
            mt.slo.inc(1, "met")

    def refused_would_miss(self) -> None:
        """Admission refused a request predicted to miss: a rejection, and a missed objective."""
        self.metrics.rejected.inc(1, "would_miss")
        self.metrics.slo.inc(1, "missed_ttft")

    # ---- escalations

    def escalation_failed(self, error: str) -> None:
        self.metrics.escalations_failed.inc(1, error.split(":")[0][:40] or "failed")

    def escalated(self, stage: str, blocks: int, bytes_per_block: int) -> None:
        mt = self.metrics
        mt.escalations.inc(1, stage)
        if blocks:
            mt.migrated_blocks.inc(blocks)
            mt.migrated_bytes.inc(blocks * bytes_per_block)

    def downtime(self, seconds: float) -> None:
        self.metrics.migration_downtime.observe(seconds)

    # ---- scrape

    def render(self, inflight: int, unstarted: int, policy_hopeless: int) -> str:
        mt = self.metrics
        mt.inflight.set(inflight)
        mt.unstarted.set(unstarted)
        mt.hopeless.values[("policy",)] = policy_hopeless
        mt.hopeless.values[("scheduler",)] = sum(self._worker_hopeless.values())
        mt.process_cpu.values[()] = time.process_time()
        return mt.render()


__all__ = ["MetricsRecorder"]
