"""python -m bench.serve: benchmark any OpenAI-compatible server with streamed requests.

Prints a result table like `vllm bench serve`, writes a JSON with per-request timings
(--json), and prints ONE JSON object as its last line of stdout. Exit status: 0 when the
run went through (failures are counted, not fatal), 1 when it could not start or was cut
short (the partial result is still printed and written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .args import add_client_args, add_slo_args, add_workload_args, load_trace_for, workload_config
from .client import ClientConfig, FatalError
from .report import finite, format_table, write_json
from .runner import execute, headline
from .workloads import RequestSpec, build_workload


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
        write_json(a.json, finite(result))
        if not a.quiet:
            print(f"wrote {a.json}", file=sys.stderr)
    print(json.dumps(finite(headline(result))), flush=True)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
