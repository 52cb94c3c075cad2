"""python -m bench.serve: benchmark any OpenAI-compatible server with streamed requests.

Prints a result table like `vllm bench serve`, writes a JSON with per-request timings
(--json), and prints ONE JSON object as its last line of stdout. Exit status: 0 when the
run went through (failures are counted, not fatal), 1 when it could not start or was cut
short (the partial result is still printed and written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Sequence

from bench import metrics
from bench.client import ClientConfig, FatalError, RunState, default_trace_path, run
from bench.workloads import RequestSpec, WorkloadConfig, build_workload, load_trace

HEADLINE_KEYS = (
    "completed", "failed", "num_requests", "attainment", "attainment_p99_tbt", "goodput_rps",
    "request_throughput_rps", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "tbt_mean_p50_s",
    "tbt_mean_p99_s", "itl_p99_s", "e2e_p50_s", "duration_s",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server address (a trailing /v1 is accepted)")
    p.add_argument("--model", default=None, help="model name (default: first id of GET /v1/models)")
    add_workload_args(p)
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s ('inf' = all at once). With a trace: rescale its timing to "
                        "this mean rate; omit to keep the trace's own timing")
    add_client_args(p)
    add_slo_args(p)
    s = p.add_argument_group("output")
    s.add_argument("--json", default=None, help="write the full result (per-request timings) here")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--quiet", action="store_true", help="print only the last-line JSON")
    return p


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["fixed", "uniform", "sharegpt", "trace"], default=None,
                   help="length distribution (default: trace if --trace is given, else fixed)")
    w.add_argument("--trace", default=None,
                   help="Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens); default "
                        "../shared/traces/azure_llm_2023_conv.csv when --dataset trace")
    w.add_argument("--trace-start", type=int, default=0, help="first trace row to replay")
    w.add_argument("--arrivals", choices=["auto", "trace", "poisson"], default="auto",
                   help="trace timing or Poisson/gamma arrivals (auto: trace timing for traces)")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times (1 = Poisson, <1 burstier)")
    w.add_argument("--num-requests", type=int, default=None)
    w.add_argument("--duration", type=float, default=None, help="send requests for this many seconds")
    w.add_argument("--prompt-len", type=int, default=256, help="fixed/uniform prompt tokens")
    w.add_argument("--output-len", type=int, default=64, help="fixed/uniform output tokens")
    w.add_argument("--range-ratio", type=float, default=0.5, help="uniform: +/- this fraction")
    w.add_argument("--prompt-scale", type=float, default=1.0, help="multiply prompt lengths")
    w.add_argument("--output-scale", type=float, default=1.0, help="multiply output lengths")
    w.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths")
    w.add_argument("--max-output-len", type=int, default=None, help="clip output lengths")
    w.add_argument("--seed", type=int, default=0)


def add_client_args(p: argparse.ArgumentParser, timeout: float = 300.0) -> None:
    c = p.add_argument_group("client")
    c.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    c.add_argument("--timeout", type=float, default=timeout, help="per-request limit (s)")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--prompt-mode", choices=["auto", "token_ids", "text"], default="auto",
                   help="auto: probe the server once (token ids + ignore_eos first, text last)")
    c.add_argument("--no-ignore-eos", action="store_true",
                   help="with a fixed --prompt-mode: do not send ignore_eos/min_tokens")
    c.add_argument("--record-output-ids", action="store_true",
                   help="greedy (temperature 0); record output token ids (return_token_ids) or text")
    c.add_argument("--send-slo", action="store_true",
                   help="add ttft_slo_ms/tbt_slo_ms to every request (Ascendra extension)")
    c.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    c.add_argument("--abort-after", type=int, default=5,
                   help="stop after this many consecutive connection failures")


def add_slo_args(p: argparse.ArgumentParser, default_ttft: float | None = 1.0,
                 default_tbt: float | None = 0.15) -> None:
    s = p.add_argument_group("SLOs")
    s.add_argument("--ttft-slo", type=float, default=default_ttft, help="TTFT SLO (s)")
    s.add_argument("--tbt-slo", type=float, default=default_tbt, help="mean-TBT SLO (s)")


def workload_config(a: argparse.Namespace, rate: float | None) -> WorkloadConfig:
    return WorkloadConfig(
        dataset=a.dataset or ("trace" if a.trace else "fixed"), num_requests=a.num_requests,
        duration_s=a.duration, rate=rate, burstiness=a.burstiness, arrivals=a.arrivals,
        prompt_len=a.prompt_len, output_len=a.output_len, range_ratio=a.range_ratio,
        trace_start=a.trace_start, prompt_scale=a.prompt_scale, output_scale=a.output_scale,
        max_prompt_len=a.max_prompt_len, max_output_len=a.max_output_len, seed=a.seed)


def load_trace_for(a: argparse.Namespace) -> list | None:
    if (a.dataset or ("trace" if a.trace else "fixed")) != "trace":
        return None
    path = a.trace or default_trace_path()
    if path is None:
        raise FatalError("no trace: pass --trace PATH (default ../shared/traces/... not found)")
    return load_trace(path)


def workload_from_args(a: argparse.Namespace) -> list[RequestSpec]:
    cfg = workload_config(a, a.rate)
    if cfg.dataset != "trace" and a.rate is None:
        raise FatalError(f"--dataset {cfg.dataset} needs --rate (requests/s, or inf)")
    return build_workload(cfg, load_trace_for(a))


def client_config(a: argparse.Namespace) -> ClientConfig:
    return ClientConfig(
        base_url=a.base_url, model=a.model, timeout_s=a.timeout,
        temperature=0.0 if a.record_output_ids else a.temperature, seed=a.seed,
        send_slo=a.send_slo, ttft_slo_s=a.ttft_slo, tbt_slo_s=a.tbt_slo,
        record_outputs=a.record_output_ids, max_concurrency=a.max_concurrency,
        abort_after=a.abort_after, prompt_mode=a.prompt_mode, extensions=not a.no_ignore_eos,
        extra_body=json.loads(a.extra_body) if a.extra_body else {})


# ------------------------------------------------------------------ running


def execute(specs: Sequence[RequestSpec], cfg: ClientConfig, progress: bool = True,
            desc: str = "requests", position: int = 0) -> dict:
    """Run a workload to the end (or until fatal error / Ctrl-C) and return the full result.
    Never raises for server trouble: the result's "error" says what went wrong."""
    state = RunState()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=desc, unit="req", position=position, leave=position == 0,
                   file=sys.stderr, dynamic_ncols=True)

    def on_done(r: metrics.RequestResult) -> None:
        if bar is not None:
            bar.update(1)
            if not r.success:
                bar.set_postfix_str(f"failed: {sum(not x.success and x.error is not None for x in state.results)}")

    error = None
    interrupted = False
    try:
        asyncio.run(run(specs, cfg, state, on_done))
    except FatalError as e:
        error = str(e)
    except KeyboardInterrupt:
        interrupted = True
        error = "interrupted by user"
    finally:
        if bar is not None:
            bar.close()
    if not state.results:  # failed before the requests were laid out
        state.results = [metrics.RequestResult(index=s.index, prompt_len=s.prompt_len,
                                               output_len=s.output_len, scheduled_s=s.arrival_s)
                         for s in specs]
    if error and not interrupted:
        state.abort_reason = state.abort_reason or error
    state.finalize("interrupted")
    return result_dict(state, cfg, error or state.abort_reason, interrupted)


def request_dict(r: metrics.RequestResult) -> dict:
    d = {
        "index": r.index, "success": r.success, "error": r.error,
        "prompt_len": r.prompt_len, "output_len": r.output_len, "n_out": r.n_out,
        "prompt_tokens": r.prompt_tokens, "finish_reason": r.finish_reason,
        "scheduled_s": r.scheduled_s, "send_s": r.send_s, "end_s": r.end_s,
        "ttft_s": metrics.ttft(r), "mean_tbt_s": metrics.mean_tbt(r), "e2e_s": metrics.e2e(r),
        # Chunk arrival times relative to the send time.
        "token_times_s": [round(t - r.send_s, 6) for t in r.token_times_s] if r.send_s is not None else [],
    }
    if any(n != 1 for n in r.chunk_tokens):
        d["chunk_tokens"] = r.chunk_tokens
    if r.output_text is not None:
        d["output_text"] = r.output_text
    if r.output_ids is not None:
        d["output_ids"] = r.output_ids
    return d


def result_dict(state: RunState, cfg: ClientConfig, error: str | None, interrupted: bool) -> dict:
    summary = metrics.summarize(state.results, state.duration_s(), cfg.ttft_slo_s, cfg.tbt_slo_s)
    caps = state.caps
    return {
        "summary": summary,
        "error": error,
        "interrupted": interrupted,
        "server": {
            "base_url": cfg.base_url, "model": state.model,
            "prompt_mode": caps.prompt_mode if caps else None,
            "ignore_eos": caps.extensions if caps else None,
            "output_token_ids": caps.token_ids if caps else None,
            # From what the requests actually carried, not from the probe alone.
            "token_counts_from": ("usage" if any(r.prompt_tokens is not None for r in state.results)
                                  else "chunks") if any(r.success for r in state.results) else None,
            "notes": caps.notes if caps else [],
            "probe_requests": state.probe_requests,
            "probe_output_tokens": state.probe_output_tokens,
        },
        "client": {k: v for k, v in asdict(cfg).items() if k != "extra_body"} | {
            "extra_body": cfg.extra_body},
        "requests": [request_dict(r) for r in state.results],
    }


def headline(result: dict) -> dict:
    s = result["summary"]
    h = {k: s.get(k) for k in HEADLINE_KEYS}
    h["prompt_mode"] = result["server"]["prompt_mode"]
    h["error"] = result["error"]
    return h


# ------------------------------------------------------------------ printing


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
        json.dump(result, f, indent=1, allow_nan=False, default=_json_default)
    os.replace(tmp, path)


def _json_default(o: object) -> object:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        specs = workload_from_args(a)
    except (FatalError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = client_config(a)
    if not a.quiet:
        span = specs[-1].arrival_s if specs else 0.0
        print(f"workload: {len(specs)} requests over {span:.1f}s, "
              f"mean prompt {sum(s.prompt_len for s in specs) / max(1, len(specs)):.0f} tok, "
              f"mean output {sum(s.output_len for s in specs) / max(1, len(specs)):.0f} tok",
              file=sys.stderr)
    t = time.time()
    result = execute(specs, cfg, progress=not a.no_progress and not a.quiet)
    result["workload"] = {"args": vars(a), "started_unix": t}
    if result["error"]:
        print(f"error: {result['error']}", file=sys.stderr)
    if not a.quiet:
        for note in result["server"]["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(format_table(result))
    if a.json:
        write_json(a.json, _finite(result))
        if not a.quiet:
            print(f"wrote {a.json}", file=sys.stderr)
    print(json.dumps(_finite(headline(result))), flush=True)
    return 1 if result["error"] else 0


def _finite(o: object) -> object:
    """inf/nan -> strings so the output is strict JSON (a rate may be inf)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


if __name__ == "__main__":
    sys.exit(main())
