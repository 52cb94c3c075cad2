"""A sweep with a burst point (rate inf) is written as strict JSON and summarised without it
distorting capacity."""

from __future__ import annotations

import json
import math

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
    results = {"sarathi": {1.0: _result(1.0), 2.0: _result(0.95), math.inf: _result(0.2)}}
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
