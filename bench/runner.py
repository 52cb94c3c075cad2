"""Run a workload against a server with the streaming client and shape the result: the
full per-request result dict, its summary and the one-line headline."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import asdict
from typing import Sequence

from . import metrics
from .client import ClientConfig, FatalError, RunState, run
from .workloads import RequestSpec


HEADLINE_KEYS = (
    "completed", "failed", "num_requests", "attainment", "attainment_p99_tbt", "goodput_rps",
    "request_throughput_rps", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "tbt_mean_p50_s",
    "tbt_mean_p99_s", "itl_p99_s", "e2e_p50_s", "duration_s",
)


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
