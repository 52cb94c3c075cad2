"""A sweep with a burst point (rate inf) is written as strict JSON and summarised without it
distorting capacity."""

from __future__ import annotations

import json
import math

import pytest

from bench.report import markdown, write_json
from bench.sweeps import load_point, summarize_sweep


def _result(attainment: float) -> dict:
    s = {"attainment": attainment, "attainment_p99_tbt": attainment, "goodput_rps": 1.0, "completed": 4,
         "failed": 0, "num_requests": 4, "request_throughput_rps": 2.0, "output_tok_s": 10.0,
         "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "tbt_mean_p50_s": 0.01, "tbt_mean_p99_s": 0.02,
         "itl_p99_s": 0.03, "e2e_p50_s": 0.5, "failure_reasons": {}}
    return {"summary": s, "error": None}


def test_rate_inf_point_is_strict_json_and_reads_back(tmp_path):
    path = tmp_path / "rate_inf.json"
    write_json(str(path), {"rate": math.inf, "summary": {"x": [1.0, -math.inf, math.nan]}})
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no Infinity/NaN
    back = load_point(path)
    assert back["rate"] == "inf" and float(back["rate"]) == math.inf
    assert back["summary"]["x"] == [1.0, "-inf", "nan"]


def test_summary_with_inf_rate_keeps_capacity_finite(tmp_path):
    rates = [1.0, 2.0, math.inf]
    results = {"sarathi": {1.0: [_result(1.0)], 2.0: [_result(0.95)], math.inf: [_result(0.2)]}}
    summary = summarize_sweep(results, ["sarathi"], rates, {"ttft_s": 1.0, "tbt_s": 0.15, "source": "given"},
                              0.9, {})
    cap = summary["capacity"]["sarathi"]
    # Attainment never fell below 90% at a finite rate: the burst does not interpolate to inf or nan.
    assert cap["bound"] == "lower_bound" and cap["value"] == 2.0
    assert [pt["rate"] for pt in summary["points"]] == rates
    assert "| sarathi | inf |" in markdown(summary)
    write_json(str(tmp_path / "summary.json"), summary)
    assert load_point(tmp_path / "summary.json")["rates"] == [1.0, 2.0, "inf"]


def test_compare_names_the_simulators_variants_and_refuses_unknown_policies(capsys, tmp_path):
    from bench import compare

    a = compare.build_parser().parse_args(["--rates", "1", "--out", str(tmp_path), "--model", "tiny"])
    cmd = compare.server_cmd(a, "ascendra-budget", 8000, {"ttft_s": 1.0, "tbt_s": 0.1})
    assert cmd[cmd.index("--policy") + 1] == "ascendra" and cmd[cmd.index("--max-seats") + 1] == "512"
    assert cmd[cmd.index("--tbt-slo") + 1] == "0.1"
    cmd = compare.server_cmd(a, "sarathi", 8000, None)
    assert cmd[cmd.index("--policy") + 1] == "sarathi" and "--max-seats" not in cmd
    # {policy} in --server-args: one step log per server when they run at once (--interleave).
    a.server_args = "--step-log /tmp/steps-{policy}.jsonl"
    cmd = compare.server_cmd(a, "ascendra-budget", 8000, None)
    assert cmd[-2:] == ["--step-log", "/tmp/steps-ascendra-budget.jsonl"]
    assert compare.main(["--rates", "1", "--out", str(tmp_path), "--policies", "sarathi,fastest"]) == 2
    assert "--policies: unknown fastest" in capsys.readouterr().err


def test_markdown_shows_attainment_per_slo_class():
    by_class = {"0.25/0.1": {"requests": 3, "attainment": 1 / 3, "ttft_met": 2 / 3},
                "5/0.25": {"requests": 7, "attainment": 1.0, "ttft_met": 1.0}}
    pt = {"policy": "ascendra", "rate": 2.0, "attainment": 0.8, "attainment_p99_tbt": 0.7, "completed": 10, "failed": 0,
          "request_throughput_rps": 2.0, "output_tok_s": 10.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2,
          "tbt_mean_p50_s": 0.01, "tbt_mean_p99_s": 0.02, "goodput_rps": 1.6, "attainment_by_class": by_class}
    summary = {"policies": ["ascendra"], "points": [pt], "threshold": 0.9,
               "capacity": {"ascendra": {"value": 2.0, "bound": "lower_bound"}},
               "slo": {"ttft_s": 0.25, "tbt_s": 0.1, "source": "per request"}}
    text = markdown(summary)
    assert "| policy | rate | 0.25/0.1 | 5/0.25 |" in text and "| ascendra | 2 | 33.3% (66.7%) | 100.0% (100.0%) |" in text
    assert text.startswith("SLOs: TTFT <= 0.25 s")
    # With classes, the header says each request carried its own objectives (the sweep's SLOs are
    # the fallback only).
    text = markdown(summary | {"config": {"slo_classes": [[0.3, 0.25, 0.1], [0.7, 5.0, 0.25]]}})
    assert text.startswith("SLO classes (share:TTFT s:TBT s) 0.3:0.25:0.1,0.7:5:0.25, each request scored")


def _requests(outputs: list[list[int]]) -> list[dict]:
    return [{"index": i, "success": True, "output_ids": o} for i, o in enumerate(outputs)]


def test_repeats_pool_into_one_curve_and_each_keeps_its_own_capacity():
    # Two repeats of a 4-request sweep: sarathi crosses 90% between 1 and 2 req/s in the pooled
    # curve (95% then 75%), ascendra only in its second repeat.
    results = {
        "sarathi": {1.0: [_result(1.0), _result(0.9)], 2.0: [_result(0.75), _result(0.75)]},
        "ascendra": {1.0: [_result(1.0), _result(1.0)], 2.0: [_result(1.0), _result(0.5)]},
    }
    summary = summarize_sweep(results, ["sarathi", "ascendra"], [1.0, 2.0], {"ttft_s": 1.0, "tbt_s": 0.1,
                              "source": "given"}, 0.9, {})
    assert [(pt["policy"], pt["rate"], pt["repeat"]) for pt in summary["points"]][:4] == [
        ("sarathi", 1.0, 0), ("sarathi", 1.0, 1), ("sarathi", 2.0, 0), ("sarathi", 2.0, 1)]
    pooled = {(pt["policy"], pt["rate"]): pt for pt in summary["pooled"]}
    assert pooled["sarathi", 1.0]["attainment"] == 0.95 and pooled["sarathi", 1.0]["attainment_per_repeat"] == [1.0, 0.9]
    assert pooled["ascendra", 2.0]["attainment"] == 0.75
    # Pooled: sarathi 0.95 -> 0.75 crosses 0.9 a quarter of the way; ascendra 1.0 -> 0.75 at 0.4.
    assert summary["capacity_rps"] == {"sarathi": pytest.approx(1.25), "ascendra": pytest.approx(1.4)}
    by_repeat = summary["capacity_by_repeat"]
    assert [c["value"] for c in by_repeat["sarathi"]] == pytest.approx([1.4, 1.0])
    assert [c["value"] for c in by_repeat["ascendra"]] == pytest.approx([2.0, 1.2])
    assert [c["bound"] for c in by_repeat["ascendra"]] == ["lower_bound", "interpolated"]
    text = markdown(summary)
    assert "| 1 | 1.4 | >= 2 (1.43x) |" in text and "| 2 | 1 | 1.2 (1.20x) |" in text
    assert "| 1 | 95.0% (95.0%) [100.0% / 90.0%] | 100.0% (100.0%) [100.0% / 100.0%] |" in text
    assert "| sarathi | 1 #2 |" in text  # the per-point table names the repeat
    # Point by point: ascendra higher at 1 #2 (1.0 vs 0.9) and 2 #1, lower at 2 #2, level at 1 #1.
    assert summary["paired"]["ascendra"] | {"mean_difference": None} == {
        "reference": "sarathi", "pairs": 4, "higher": 2, "lower": 1, "mean_difference": None}
    assert summary["paired"]["ascendra"]["mean_difference"] == pytest.approx((0.1 + 0.25 - 0.25) / 4)
    assert "ascendra against sarathi, point by point (same rate and repeat): higher at 2, lower at 1 of 4" in text


def test_a_single_repeat_summary_has_no_repeat_table():
    summary = summarize_sweep({"sarathi": {1.0: [_result(0.95)]}}, ["sarathi"], [1.0], None, 0.9, {})
    assert "capacity_by_repeat" not in summary and summary["pooled"][0]["attainment"] == 0.95
    assert "repeat" not in markdown(summary).split("| policy | capacity")[1].split("Attainment by rate")[0]


def test_outputs_are_compared_repeat_by_repeat():
    from bench.sweeps import check_outputs

    a = {"requests": _requests([[1, 2], [3, 4]])}
    b = {"requests": _requests([[1, 2], [3, 5]])}
    results = {"sarathi": {1.0: [a, a]}, "ascendra": {1.0: [a, b]}}
    report = check_outputs(results, ["sarathi", "ascendra"])
    got = report["policies"]["ascendra"]
    assert (got["compared"], got["mismatches"], report["identical"]) == (4, 1, False)
    assert got["examples"] == [{"rate": 1.0, "index": 1, "first_diff_at": 1}]
