"""The coordinator's Prometheus metrics (counters, gauges, histograms).

Names follow vLLM's where the meaning is the same, under the ``ascendra:`` prefix.
Observations are plain attribute updates so the per-token cost stays small; the values become
``prometheus_client`` metric families only when ``/metrics`` is scraped (a custom collector),
and ``prometheus_client`` writes the text exposition.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

PREFIX = "ascendra:"


class _Metric:
    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.name = PREFIX + name
        self.help = help
        self.labelnames = tuple(labelnames)

    def family(self) -> Metric:
        raise NotImplementedError


class Counter(_Metric):
    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (), initial: Iterable[tuple[str, ...]] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {tuple(v): 0.0 for v in initial}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def family(self) -> Metric:
        # CounterMetricFamily adds the `_total` suffix to the sample name.
        f = CounterMetricFamily(self.name, self.help, labels=self.labelnames)
        values = self.values or ({} if self.labelnames else {(): 0.0})
        for labels, v in sorted(values.items()):
            f.add_metric(labels, v)
        return f


class Gauge(_Metric):
    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def family(self) -> Metric:
        f = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        values = self.values or ({} if self.labelnames else {(): 0.0})
        for labels, v in sorted(values.items()):
            f.add_metric(labels, v)
        return f


class Histogram(_Metric):
    """Unlabelled histogram with fixed upper bounds (cumulated only when scraped)."""

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help)
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def observe_many(self, v: float, n: int) -> None:
        self.counts[bisect_left(self.bounds, v)] += n
        self.sum += v * n
        self.count += n

    def family(self) -> Metric:
        cumulative, buckets = 0, []
        for bound, c in zip(self.bounds, self.counts):
            cumulative += c
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(self.name, self.help, buckets=buckets, sum_value=self.sum)


class _Collector:
    """Hands prometheus_client the current values of the given metrics at scrape time."""

    def __init__(self, metrics: Iterable[_Metric]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        for m in self.metrics:
            yield m.family()


def exposition(metrics: Iterable[_Metric]) -> str:
    """Prometheus text format (0.0.4) of these metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics))
    return generate_latest(registry).decode()


# vLLM's bucket choices, so dashboards built for it read these the same way.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]

FINISH_REASONS = ("stop", "length", "abort", "error")
SLO_RESULTS = ("met", "missed_ttft", "missed_tbt", "failed")


class ServerMetrics:
    """Every metric the coordinator exposes."""

    def __init__(self) -> None:
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to first token.", TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Gap between consecutive output tokens.", ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", LATENCY_BUCKETS)
        self.queue = Histogram(
            "request_queue_time_seconds",
            "Time a request waited in the coordinator before it was sent to a worker.",
            LATENCY_BUCKETS,
        )
        self.mean_tbt = Histogram(
            "request_time_per_output_token_seconds", "Per request mean gap between output tokens: (last - first) / (n - 1).", ITL_BUCKETS
        )
        self.success = Counter(
            "request_success_total", "Finished requests by finish reason.", ("finished_reason",),
            initial=[(r,) for r in FINISH_REASONS],
        )
        self.slo = Counter(
            "slo_requests_total",
            "Requests judged against their TTFT and mean-TBT objectives (failed = ended in error).",
            ("result",), initial=[(r,) for r in SLO_RESULTS],
        )
        self.rejected = Counter(
            "request_rejected_total", "Requests refused before admission.", ("reason",),
            initial=[("queue_full",), ("no_worker",), ("invalid",), ("unauthorized",), ("would_miss",)],
        )
        self.hopeless = Counter(
            "requests_hopeless",
            "Requests judged unable to meet their objectives and served best-effort, by who judged: the "
            "coordinator's policy or the workers' schedulers (a request may be counted by both).",
            ("judged_by",), initial=[("policy",), ("scheduler",)],
        )
        self.client_disconnects = Counter(
            "client_disconnects_total", "Requests whose client closed the connection before the last event.")
        self.worker_messages_dropped = Counter(
            "worker_messages_dropped_total",
            "Messages on the worker socket dropped: from an identity not bound to a worker, or claiming another.",
            ("reason",), initial=[("unknown_identity",), ("wrong_worker",), ("undecodable",)],
        )
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("generation_tokens_total", "Generated tokens.")
        self.running = Gauge("num_requests_running", "Requests in the worker's running batch.", ("instance",))
        self.waiting = Gauge("num_requests_waiting", "Requests queued on the worker.", ("instance",))
        self.kv_usage = Gauge("kv_cache_usage_perc", "Fraction of the worker's KV blocks in use (0-1).", ("instance",))
        self.preempted = Gauge("num_preemptions", "Requests preempted in the worker's last step.", ("instance",))
        self.worker_up = Gauge("worker_up", "1 while the worker process is alive and registered.", ("instance", "role"))
        self.inflight = Gauge("coordinator_requests_inflight", "Requests the coordinator is serving.")
        self.unstarted = Gauge("coordinator_requests_waiting", "Admitted requests without a first token yet.")
        self.escalations = Counter(
            "escalations_total", "Requests escalated from a low- to a high-priority instance, by the stage they were in.",
            ("stage",), initial=[("waiting",), ("prefill",), ("decode",)],
        )
        self.escalations_failed = Counter(
            "escalations_failed_total", "Escalations abandoned (no room, request ended, worker died).", ("reason",),
        )
        self.migrated_blocks = Counter("migrated_blocks_total", "KV blocks copied between instances by escalations.")
        self.migrated_bytes = Counter("migrated_bytes_total", "KV bytes copied between instances by escalations.")
        self.migration_downtime = Histogram(
            "migration_downtime_seconds",
            "Time an escalated request was frozen: from the source pausing it to the destination's next token.",
            ITL_BUCKETS,
        )
        self.process_cpu = Counter("process_cpu_seconds_total",
                                   "CPU seconds (user + system) the coordinator process has used; workers excluded.")
        self.step_time_error = Histogram(
            "step_time_prediction_error_ratio",
            "Performance model: |predicted - measured| / measured step time, per worker step.",
            [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0],
        )

    def all(self) -> list[_Metric]:
        return [
            self.ttft, self.itl, self.e2e, self.queue, self.mean_tbt, self.success, self.slo, self.rejected,
            self.prompt_tokens, self.generation_tokens, self.running, self.waiting, self.kv_usage,
            self.preempted, self.worker_up, self.inflight, self.unstarted, self.escalations,
            self.escalations_failed, self.migrated_blocks, self.migrated_bytes, self.migration_downtime,
            self.step_time_error, self.process_cpu, self.client_disconnects, self.worker_messages_dropped,
            self.hopeless,
        ]

    def render(self) -> str:
        return exposition(self.all())
