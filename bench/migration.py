"""Migration downtime against context length, between two real worker processes.

    python -m bench.migration [--model tiny|PATH] [--contexts 128,512,1024,1792]

For each context length one request decodes on worker 0; after a few tokens it is
escalated to worker 1 with the coordinator's own Migrator (pre-copy, freeze, commit,
release), its KV moving through the shared pool (POSIX shm on CPU, CUDA IPC on GPU).
Reported per length: blocks pre-copied while the source kept decoding, blocks copied
while frozen, the downtime (source froze it -> destination's next token), the token gap
across the move and the normal decode step for comparison. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ascendra.messages import AddRequest, SamplingParams
from ascendra.migrator import Migrator
from ascendra.models import resolve_model
from ascendra.router import Escalation
from workers.driver import WorkerDriver


def measure(d: WorkerDriver, rid: str, context: int, out_tokens: int) -> dict:
    sp = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
    d.send(0, AddRequest(rid, [(7 * i) % 5000 + 100 for i in range(context)], sp, time.monotonic()))
    mig = Migrator(d.send)
    times: list[tuple[float, int]] = []  # (arrival of a token at the driver, worker)
    src_steps: list[float] = []
    result = None
    started = False
    while True:
        step = d.recv(120)
        now = time.monotonic()
        if step.worker_id == 0 and step.num_decode_tokens == 1 and step.num_prefill_tokens == 0:
            src_steps.append(step.step_time)
        finished = False
        for o in step.outputs:
            if o.request_id == rid:
                times.extend((now, step.worker_id) for _ in o.new_token_ids)
                finished |= o.finish_reason is not None
        for up in step.migrations:
            r = mig.on_update(step.worker_id, up, now)
            if r is not None:
                result = r.migration
        if not started and len(times) >= 6:
            mig.start(Escalation(rid, 0, 1, "bench"), now)
            started = True
        if finished:
            break
    assert result is not None and result.ok, result
    first_dst = next(t for t, w in times if w == 1)
    last_src = max(t for t, w in times if w == 0)
    gaps = [b[0] - a[0] for a, b in zip(times, times[1:]) if a[1] == b[1]]
    return {
        "context": context,
        "blocks_precopied": result.blocks_copied - result.frozen_blocks,
        "blocks_frozen": result.frozen_blocks,
        "downtime_ms": round((first_dst - result.frozen_at) * 1e3, 2),
        "gap_across_move_ms": round((first_dst - last_src) * 1e3, 2),
        "normal_gap_ms": round(statistics.median(gaps) * 1e3, 2),
        "decode_step_ms": round(statistics.median(src_steps) * 1e3, 2) if src_steps else None,
        "copy_ms": round(result.copy_time * 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path, 'tiny', or the embedded SmolLM2 (default)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda:0 (both workers on it) for CUDA IPC")
    ap.add_argument("--contexts", default="128,512,1024,1792")
    ap.add_argument("--out-tokens", type=int, default=24)
    args = ap.parse_args()
    model = resolve_model(args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    blocks = 2 * (max(contexts) + args.out_tokens) // 16 + 16
    d = WorkerDriver(model.path, "--num-blocks", str(blocks), "--profile", "off",
                     "--device", args.device, "--threads", "1", worker_ids=(0, 1))
    rows = []
    try:
        d.wait_registered(600)
        for i, ctx in enumerate(contexts):
            rows.append(measure(d, f"m{i}", ctx, args.out_tokens))
            print(rows[-1], flush=True)
    finally:
        d.close()
    print(f"\n{'context':>8} {'pre-copied':>10} {'frozen':>7} {'downtime ms':>12} {'gap ms':>8} "
          f"{'normal gap':>10} {'decode step':>11}")
    for r in rows:
        print(f"{r['context']:>8} {r['blocks_precopied']:>10} {r['blocks_frozen']:>7} {r['downtime_ms']:>12} "
              f"{r['gap_across_move_ms']:>8} {r['normal_gap_ms']:>10} {r['decode_step_ms']!s:>11}")
    print(json.dumps({"model": model.name, "device": args.device, "rows": rows}))


if __name__ == "__main__":
    main()
