"""Command-line argument groups shared by the load generator, the policy comparison and the
simulator (workload, client, SLOs), and what they build."""

from __future__ import annotations

import argparse

from ascendra.config import default

from .client import FatalError, default_trace_path
from .workloads import WorkloadConfig, burstiness_for_cv, load_trace


def parse_slo_classes(text: str) -> tuple[tuple[float, float, float], ...]:
    """"0.3:0.25:0.1,0.7:5:0.25" -> ((0.3, 0.25, 0.1), (0.7, 5.0, 0.25))."""
    classes = []
    for part in text.split(","):
        if not part.strip():
            continue
        fields = part.split(":")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(f"SLO class {part!r} is not share:ttft_s:tbt_s")
        try:
            share, ttft, tbt = (float(x) for x in fields)
        except ValueError:
            raise argparse.ArgumentTypeError(f"SLO class {part!r} has a non-number") from None
        if share < 0 or ttft <= 0 or tbt <= 0:
            raise argparse.ArgumentTypeError(f"SLO class {part!r}: share >= 0, SLOs > 0")
        classes.append((share, ttft, tbt))
    if classes and abs(sum(c[0] for c in classes) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"SLO class shares sum to {sum(c[0] for c in classes):g}, not 1")
    return tuple(classes)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["fixed", "uniform", "sharegpt", "longbench", "code", "trace"], default=None,
                   help="length distribution (default: trace if --trace is given, else fixed)")
    w.add_argument("--trace", default=None,
                   help="Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens); default "
                        "../shared/traces/azure_llm_2023_conv.csv when --dataset trace")
    w.add_argument("--trace-start", type=int, default=0, help="first trace row to replay")
    w.add_argument("--arrivals", choices=["auto", "trace", "poisson"], default="auto",
                   help="trace timing or Poisson/gamma arrivals (auto: trace timing for traces)")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times (1 = Poisson, <1 burstier)")
    w.add_argument("--burst-cv", type=float, default=None,
                   help="coefficient of variation of inter-arrival gaps (1 = Poisson, 3 = bursty); "
                        "overrides --burstiness")
    w.add_argument("--slo-classes", type=parse_slo_classes, default=(),
                   help="per-request objectives, share:ttft_s:tbt_s per class, comma-separated, e.g. "
                        "0.3:0.25:0.1,0.7:5:0.25 (shares sum to 1); each request sends and is scored "
                        "against its own class's SLOs")
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


def add_slo_args(p: argparse.ArgumentParser, default_ttft: float | None = default("ttft_slo"),
                 default_tbt: float | None = default("tbt_slo")) -> None:
    """--ttft-slo / --tbt-slo; the defaults are the server's (ascendra.config)."""
    s = p.add_argument_group("SLOs")
    s.add_argument("--ttft-slo", type=float, default=default_ttft, help="TTFT SLO (s)")
    s.add_argument("--tbt-slo", type=float, default=default_tbt, help="mean-TBT SLO (s)")


def workload_config(a: argparse.Namespace, rate: float | None) -> WorkloadConfig:
    return WorkloadConfig(
        dataset=a.dataset or ("trace" if a.trace else "fixed"), num_requests=a.num_requests,
        duration_s=a.duration, rate=rate,
        burstiness=burstiness_for_cv(a.burst_cv) if a.burst_cv is not None else a.burstiness,
        arrivals=a.arrivals, slo_classes=tuple(a.slo_classes),
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
