"""Writers: the per-run table in the style of `vllm bench serve`, a sweep's markdown tables
and attainment plot, and strict, atomic JSON files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from . import metrics


def markdown(summary: dict) -> str:
    pols = summary["policies"]
    caps = summary["capacity"]
    slo = summary["slo"]
    g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    classes = _classes_label(summary.get("config") or {})
    lines = [
        (f"SLO classes (share:TTFT s:TBT s) {classes}, each request scored against its own; for requests "
         f"without one: " if classes else "SLOs: ")
        + f"TTFT <= {g(slo['ttft_s'])} s, mean TBT <= {g(slo['tbt_s'])} s ({slo['source']}); "
        f"capacity = rate where attainment crosses {summary['threshold']:.0%}.",
        "",
        "| policy | capacity (req/s) |",
        "|---|---|",
    ]
    for p in pols:
        lines.append(f"| {p} | {metrics.Capacity(caps[p]['value'], caps[p]['bound']).label()} |")
    by_repeat = summary.get("capacity_by_repeat")
    if by_repeat:
        lines += _repeat_capacity_table(pols, by_repeat)
    for p, pair in (summary.get("paired") or {}).items():
        if pair["pairs"] > 1:
            lines += ["", f"{p} against {pair['reference']}, point by point (same rate and repeat): higher at "
                      f"{pair['higher']}, lower at {pair['lower']} of {pair['pairs']} points, attainment "
                      f"{100 * pair['mean_difference']:+.1f} points on average."]
    pooled = _pooled(summary)
    repeated = any(pt["repeats"] > 1 for pt in pooled)
    lines += ["", "Attainment by rate (p99-TBT variant in brackets"
              + ("; over all repeats, then each repeat's" if repeated else "") + "):", "",
              "| rate (req/s) | " + " | ".join(pols) + " |", "|---" * (len(pols) + 1) + "|"]
    by = {(pt["policy"], pt["rate"]): pt for pt in pooled}
    for rate in sorted({pt["rate"] for pt in pooled}):
        cells = []
        for p in pols:
            pt = by.get((p, rate))
            cell = "-" if pt is None else f"{pt['attainment']:.1%} ({pt['attainment_p99_tbt']:.1%})"
            if pt is not None and pt["repeats"] > 1:
                cell += " [" + " / ".join(f"{a:.1%}" for a in pt["attainment_per_repeat"]) + "]"
            cells.append(cell)
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines += ["", "| policy | rate | completed | failed | req/s | out tok/s | TTFT p50 / p99 (s) | "
              "TPOT p50 / p99 (s) | goodput (req/s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for pt in summary["points"]:
        lines.append(f"| {pt['policy']} | {_rate_label(pt)} | {pt['completed']} | {pt['failed']} | "
                     f"{f(pt.get('request_throughput_rps'))} | {f(pt['output_tok_s'])} | "
                     f"{f(pt['ttft_p50_s'])} / {f(pt['ttft_p99_s'])} | "
                     f"{f(pt['tbt_mean_p50_s'])} / {f(pt['tbt_mean_p99_s'])} | {f(pt.get('goodput_rps'))} |")
    classes = [pt for pt in summary["points"] if pt.get("attainment_by_class")]
    if classes:
        names = list(classes[0]["attainment_by_class"])
        lines += ["", "Attainment per SLO class (TTFT / TBT objective, s; the share meeting the TTFT alone in "
                  "brackets):", "", "| policy | rate | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for pt in classes:
            by_class = pt["attainment_by_class"]
            cells = [f"{by_class[n]['attainment']:.1%} ({by_class[n]['ttft_met']:.1%})" if n in by_class else "-"
                     for n in names]
            lines.append(f"| {pt['policy']} | {_rate_label(pt)} | " + " | ".join(cells) + " |")
    oc = summary.get("output_check")
    if oc:
        lines += ["", f"Greedy outputs vs {oc['reference']}: " + "; ".join(
            f"{p}: {v['mismatches']} of {v['compared']} differ" for p, v in oc["policies"].items())]
    return "\n".join(lines) + "\n"


def _classes_label(config: dict) -> str:
    """--slo-classes as given (share:TTFT:TBT, comma-separated), or "" without classes."""
    return ",".join(":".join(f"{v:g}" for v in c) for c in config.get("slo_classes") or ())


def _pooled(summary: dict) -> list[dict]:
    # A summary saved before repeats existed has points only: one repeat each.
    return summary.get("pooled") or [pt | {"repeats": 1} for pt in summary["points"]]


def _rate_label(pt: dict) -> str:
    return f"{pt['rate']:g}" + (f" #{pt['repeat'] + 1}" if pt.get("repeat") else "")


def _repeat_capacity_table(pols: list[str], by_repeat: dict[str, list[dict]]) -> list[str]:
    ref = pols[0]
    others = pols[1:]
    lines = ["", "Capacity of each repeat on its own (req/s" + (f"; ratio to {ref}" if others else "") + "):", "",
             "| repeat | " + " | ".join(pols) + " |", "|---" * (len(pols) + 1) + "|"]
    for k in range(len(by_repeat[ref])):
        cells = []
        for p in pols:
            c = by_repeat[p][k]
            cell = metrics.Capacity(c["value"], c["bound"]).label()
            base = by_repeat[ref][k]["value"]
            if p != ref and c["value"] is not None and base:
                cell += f" ({c['value'] / base:.2f}x)"
            cells.append(cell)
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in summary["policies"]:
        # A burst (rate inf) has no place on a rate axis; the tables show it.
        pts = sorted((pt["rate"], pt["attainment"]) for pt in _pooled(summary)
                     if pt["policy"] == p and math.isfinite(pt["rate"]))
        if not pts:
            continue
        cap = metrics.Capacity(summary["capacity"][p]["value"], summary["capacity"][p]["bound"])
        line, = ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=f"{p} (cap {cap.label()})")
        if summary.get("capacity_by_repeat"):
            # Each repeat as a faint dot around the pooled line: the spread a single run hides.
            each = [(pt["rate"], pt["attainment"]) for pt in summary["points"]
                    if pt["policy"] == p and math.isfinite(pt["rate"])]
            ax.scatter([r for r, _ in each], [a * 100 for _, a in each], s=12, alpha=0.4, color=line.get_color())
    ax.axhline(summary["threshold"] * 100, color="grey", ls="--", lw=1)
    slo = summary["slo"]
    g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    classes = _classes_label(summary["config"])
    objectives = (f"SLO classes {classes}" if classes
                  else f"TTFT<={g(slo['ttft_s'])}s, TBT<={g(slo['tbt_s'])}s")
    ax.set_title(f"{summary['config']['model']}, {summary['config']['num_instances']} instances; {objectives}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.2f}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def format_table(result: dict) -> str:
    s, srv = result["summary"], result["server"]
    rows: list[tuple[str, str] | str] = [
        " Serving Benchmark Result ",
        ("Successful requests:", str(s["completed"])),
        ("Failed requests:", str(s["failed"])),
        ("Requests sent:", f"{s['sent']} of {s['num_requests']}"),
        ("Benchmark duration (s):", _num(s["duration_s"])),
        ("Total input tokens:", str(s["total_input_tokens"])),
        ("Total generated tokens:", str(s["total_output_tokens"])),
        ("Request throughput (req/s):", _num(s["request_throughput_rps"])),
        ("Output token throughput (tok/s):", _num(s["output_tok_s"])),
        ("Total token throughput (tok/s):", _num(s["total_tok_s"])),
        (f"SLO attainment (TTFT<={s['ttft_slo_s']:.3g}s,TBT<={s['tbt_slo_s']:.3g}s):",
         _num(s["attainment"], ".3f")),
        ("SLO attainment, p99-TBT variant:", _num(s["attainment_p99_tbt"], ".3f")),
        *((f"  class TTFT/TBT {name} s ({c['requests']} requests):", _num(c["attainment"], ".3f"))
          for name, c in (s.get("attainment_by_class") or {}).items()),
        ("Goodput (req/s):", _num(s["goodput_rps"])),
        ("Prompts sent as:", f"{srv['prompt_mode']}{' + ignore_eos' if srv['ignore_eos'] else ''}"),
        ("Token counts from:", str(srv["token_counts_from"])),
        " Time to First Token ",
        ("Mean TTFT (ms):", _ms(s["ttft_mean_s"])),
        ("Median TTFT (ms):", _ms(s["ttft_p50_s"])),
        ("P99 TTFT (ms):", _ms(s["ttft_p99_s"])),
        " Time per Output Token (per-request mean TBT) ",
        ("Mean TPOT (ms):", _ms(s["tbt_mean_mean_s"])),
        ("Median TPOT (ms):", _ms(s["tbt_mean_p50_s"])),
        ("P99 TPOT (ms):", _ms(s["tbt_mean_p99_s"])),
        " Inter-token Latency (all gaps) ",
        ("Mean ITL (ms):", _ms(s["itl_mean_s"])),
        ("Median ITL (ms):", _ms(s["itl_p50_s"])),
        ("P99 ITL (ms):", _ms(s["itl_p99_s"])),
        " End-to-end Latency ",
        ("Mean E2EL (ms):", _ms(s["e2e_mean_s"])),
        ("Median E2EL (ms):", _ms(s["e2e_p50_s"])),
        ("P99 E2EL (ms):", _ms(s["e2e_p99_s"])),
    ]
    lines = []
    for row in rows:
        if isinstance(row, str):
            fill = "=" if row == rows[0] else "-"
            lines.append(f"{row:{fill}^60}")
        else:
            lines.append(f"{row[0]:<38}{row[1]:>22}")
    for reason, n in s["failure_reasons"].items():
        lines.append(f"{'  failed, ' + reason + ':':<38}{n:>22}")
    lines.append("=" * 60)
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    """Atomic write: a reader (or a resumed sweep) never sees half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        # A rate of inf (all requests at once) is a valid point: written as the string "inf".
        json.dump(finite(result), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def finite(o: object) -> object:
    """inf/nan -> strings so the output is strict JSON (a rate may be inf)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [finite(v) for v in o]
    return o
