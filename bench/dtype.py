"""python -m bench.dtype: our runtime in fp32 against bf16 on CPU, same prompts, one process.

For each batch size it runs the same greedy requests (equal prompts and output lengths) through
the engine in float32 and in bfloat16 and prints output tokens/s for each, and how many of the
bf16 requests' greedy tokens equal fp32's (bf16 rounds the logits: ties and near-ties may flip a
token, after which the continuation differs). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ascendra.messages import AddRequest, SamplingParams
from ascendra.models import resolve_model
from bench.runtime import make_prompts
from workers.engine import Engine, EngineConfig
from workers.model_runner import ModelRunner


def run(runner: ModelRunner, prompts: list[list[int]], out_len: int) -> tuple[float, list[list[int]]]:
    engine = Engine(runner, EngineConfig(num_blocks=2048, block_size=16, policy="sarathi", chunk_size=4096,
                                         max_num_seqs=128, share_pool=False))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        assert engine.add_request(AddRequest(f"r{i}", p, sp, time.monotonic())) is None
    while engine.has_work():
        for o in engine.step().outputs:
            tokens[o.request_id].extend(o.new_token_ids)
    return time.perf_counter() - start, [tokens[f"r{i}"] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path, 'tiny', or the embedded SmolLM2 (default)")
    ap.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model.path)
    runners = {name: ModelRunner(model.path, model.name, torch.device("cpu"), dtype=dt)
               for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    result: dict = {"model": model.name, "threads": args.threads, "prompt_len": args.prompt_len,
                    "output_len": args.output_len, "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        prompts = make_prompts(tok, [args.prompt_len] * b, b)
        row: dict = {}
        outs = {}
        for name, runner in runners.items():
            run(runner, prompts[:2], 2)  # warm-up
            secs, outs[name] = run(runner, prompts, args.output_len)
            row[f"{name}_tok_s"] = round(b * args.output_len / secs, 1)
        same = sum(a == c for a, c in zip(outs["float32"], outs["bfloat16"]))
        first = sum(a[0] == c[0] for a, c in zip(outs["float32"], outs["bfloat16"]))
        row["bf16_over_fp32"] = round(row["bfloat16_tok_s"] / row["float32_tok_s"], 3)
        row["greedy_equal_requests"] = f"{same}/{b}"
        row["first_token_equal"] = f"{first}/{b}"
        result["batches"][b] = row
        print(f"batch {b}: fp32 {row['float32_tok_s']} tok/s, bf16 {row['bfloat16_tok_s']} tok/s "
              f"(x{row['bf16_over_fp32']}), greedy outputs equal for {same}/{b} requests, "
              f"first token for {first}/{b}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
