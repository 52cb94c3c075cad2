"""Metrics recording: the hopeless counts from the policy and from each worker's latest step."""

from ascendra.messages import StepOutput
from ascendra.metrics import ServerMetrics
from ascendra.recorder import MetricsRecorder
from tests.server_harness import parse_metrics


def _step(wid: int, hopeless: int) -> StepOutput:
    return StepOutput(worker_id=wid, step=1, outputs=[], num_seqs=0, num_prefill_tokens=0, num_decode_tokens=0,
                      prefill_context_tokens=0, decode_context_tokens=0, step_time=0.0, num_running=0,
                      num_waiting=0, num_preempted=0, free_blocks=10, total_blocks=10, time=0.0,
                      num_hopeless=hopeless)


def test_hopeless_counts_sum_each_workers_latest_count():
    rec = MetricsRecorder(ServerMetrics())
    rec.step(_step(0, 3), None)
    rec.step(_step(1, 2), None)
    rec.step(_step(0, 4), None)  # a worker reports its running total: the latest replaces the earlier
    mt = parse_metrics(rec.render(inflight=0, unstarted=0, policy_hopeless=5))
    assert mt['ascendra:requests_hopeless_total{judged_by="scheduler"}'] == 6
    assert mt['ascendra:requests_hopeless_total{judged_by="policy"}'] == 5


def test_a_refusal_by_admission_is_a_rejection_and_a_miss():
    rec = MetricsRecorder(ServerMetrics())
    rec.refused_would_miss()
    mt = parse_metrics(rec.render(0, 0, 0))
    assert mt['ascendra:request_rejected_total{reason="would_miss"}'] == 1
    assert mt['ascendra:slo_requests_total{result="missed_ttft"}'] == 1
