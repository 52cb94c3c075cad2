"""Our runtime against transformers' `generate`, and vLLM's offline engine where a vLLM venv is
given, on the same prompts (SmolLM2 on CPU by default).

    python -m bench.runtime [--quick] [--model PATH|tiny] [--dtype auto|float32|bfloat16]
                            [--vllm-venv VENV [--vllm-batches 16,64]]

Three measurements, side by side in one run:
- greedy_match: our greedy tokens equal transformers' for prompts of different lengths,
  run together with chunked prefill.
- static: 16 equal prompts, equal output lengths: one static batch is transformers' best case.
- mixed: requests of mixed prompt and output lengths. transformers gets the best static
  batching we can give it: requests sorted by output length (an oracle it would not have
  in service) and cut into batches; the best of the tried batch sizes is reported. Only
  requested tokens count as output, for both.
- vllm (with --vllm-venv): for each batch size, that many equal-length prompts through our
  engine and through vLLM's offline ``LLM.generate`` (run by VENV/bin/python in a subprocess, at
  the same dtype, its own thread binding): output tokens/s of each, and how many requests' greedy
  tokens are equal. Each side is timed after a warm-up, from submission to the last token.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from ascendra.messages import AddRequest, SamplingParams
from ascendra.models import resolve_model
from workers.engine import Engine, EngineConfig
from workers.model_runner import ModelRunner

VLLM_OFFLINE = Path(__file__).resolve().parent / "vllm_shim" / "vllm_offline.py"


def make_prompts(tokenizer, lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts of exact token counts cut from varied real text, so no two are alike."""
    words = ("the of and to in is was for on that with as by at from his her it an were which "
             "are this be had not but have one they you all their there been has when who more "
             "city river music history science language water market energy family").split()
    rng = random.Random(seed)
    out = []
    for n in lengths:
        text = " ".join(rng.choice(words) for _ in range(n * 2))
        ids = tokenizer(text).input_ids[:n]
        out.append(ids)
    return out


def run_ours(engine: Engine, prompts: list[list[int]], outputs: list[int], desc: str) -> tuple[float, list[list[int]]]:
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, outputs)):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        rejected = engine.add_request(AddRequest(f"r{i}", p, sp, time.monotonic()))
        assert rejected is None, rejected
    with tqdm(total=sum(outputs), desc=desc, unit="tok", leave=False) as bar:
        while engine.has_work():
            res = engine.step()
            for o in res.outputs:
                tokens[o.request_id].extend(o.new_token_ids)
                bar.update(len(o.new_token_ids))
    elapsed = time.perf_counter() - start
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return elapsed, [tokens[f"r{i}"] for i in range(len(prompts))]


def run_hf(model, prompts: list[list[int]], outputs: list[int], batch_size: int, pad_id: int,
           desc: str) -> float:
    """Static batches: sorted by output length (oracle), left-padded, each run to its longest output."""
    order = sorted(range(len(prompts)), key=lambda i: outputs[i])
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=sum(outputs), desc=desc, unit="tok", leave=False) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            n = max(outputs[i] for i in idx)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad_id)
            bar.update(sum(outputs[i] for i in idx))
    return time.perf_counter() - start


def hf_greedy_single(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        y = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=model.config.eos_token_id)
    return y[0, len(prompt):].tolist()


def run_vllm(venv: str, model_path: str, dtype: str, prompts: list[list[int]], outputs: list[int],
             max_model_len: int) -> dict:
    """vLLM's offline engine on the same prompts, in its own venv (the shim makes it import)."""
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"--vllm-venv: no python at {py}")
    # vLLM's CPU backend reads gpu_memory_utilization as the share of RAM for its KV cache; its
    # default (0.9) fails to start next to our engine, 0.5 is what `bench.compare --peer` uses.
    job = {"model": model_path, "dtype": dtype, "prompts": prompts, "output_lens": outputs,
           "max_model_len": max_model_len, "engine_args": {"gpu_memory_utilization": 0.5}}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(job, f)
        f.flush()
        env = dict(os.environ, PYTHONPATH=str(VLLM_OFFLINE.parent), VLLM_TARGET_DEVICE="cpu",
                   VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        res = subprocess.run([str(py), str(VLLM_OFFLINE), f.name], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"vLLM offline run failed (exit {res.returncode}):\n{res.stderr[-8000:]}")
    marker = "VLLM_OFFLINE_RESULT "  # bench/vllm_shim/vllm_offline.py's MARKER (vLLM logs to stdout too)
    line = next((x for x in res.stdout.splitlines() if x.startswith(marker)), None)
    if line is None:
        raise SystemExit(f"vLLM offline run printed no result:\n{res.stdout[-3000:]}")
    return json.loads(line[len(marker):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path, 'tiny', or the embedded SmolLM2 (default)")
    ap.add_argument("--quick", action="store_true", help="smaller workload, under 3 minutes on 2 cores")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="our runtime's dtype, and transformers' and vLLM's (auto: the server's CPU default)")
    ap.add_argument("--vllm-venv", default=None, help="a venv with vLLM's CPU build: compare with its offline engine")
    ap.add_argument("--vllm-batches", default="16,64", help="batch sizes of the vLLM comparison")
    ap.add_argument("--skip-hf", action="store_true", help="only the vLLM comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from workers.device import keep_allocations_in_heap

    keep_allocations_in_heap()  # as the worker does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model.path)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    runner = ModelRunner(model.path, model.name, torch.device("cpu"), dtype)
    dtype_name = str(runner.dtype).removeprefix("torch.")
    if args.skip_hf:
        if not args.vllm_venv:
            raise SystemExit("--skip-hf leaves nothing to run without --vllm-venv")
        print(json.dumps(compare_vllm(args, runner, tok, model.path, dtype_name)))
        return
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=runner.dtype).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else hf.config.eos_token_id
    q = args.quick
    rng = random.Random(args.seed)

    def engine(chunk: int) -> Engine:
        return Engine(runner, EngineConfig(num_blocks=2048, block_size=16, policy="sarathi",
                                           chunk_size=chunk, max_num_seqs=128, share_pool=False))

    # 1. greedy equality, chunked prefill (64) with prompts of different lengths run together
    g_prompts = make_prompts(tok, [5, 17, 40, 64, 65, 100, 150, 210], args.seed)
    g_n = 8 if q else 16
    _, ours = run_ours(engine(64), g_prompts, [g_n] * len(g_prompts), "greedy (ours)")
    ref = [hf_greedy_single(hf, p, g_n) for p in tqdm(g_prompts, desc="greedy (hf)", leave=False)]
    greedy_match = ours == ref

    # 2. static batch: 16 equal prompts
    s_len, s_out = (128, 32) if q else (256, 128)
    s_prompts = make_prompts(tok, [s_len] * 16, args.seed + 1)
    run_ours(engine(4096), s_prompts[:2], [2, 2], "warm-up")
    t_ours_s, _ = run_ours(engine(4096), s_prompts, [s_out] * 16, "static (ours)")
    t_hf_s = run_hf(hf, s_prompts, [s_out] * 16, 16, pad, "static (hf)")
    static_ours = 16 * s_out / t_ours_s
    static_hf = 16 * s_out / t_hf_s

    # 3. mixed lengths: continuous batching against the best static batching
    m_n = 32 if q else 64
    m_prompt = [rng.randint(16, 256) for _ in range(m_n)]
    m_out = [max(4, min(int(rng.expovariate(1 / (48 if q else 96))), 160 if q else 320)) for _ in range(m_n)]
    m_prompts = make_prompts(tok, m_prompt, args.seed + 2)
    t_ours_m, _ = run_ours(engine(512), m_prompts, m_out, "mixed (ours)")
    hf_batches = [16] if q else [16, 32]
    t_hf_m = min(run_hf(hf, m_prompts, m_out, b, pad, f"mixed (hf, batch {b})") for b in hf_batches)
    mixed_ours = sum(m_out) / t_ours_m
    mixed_hf = sum(m_out) / t_hf_m

    result = {
        "model": model.name,
        "device": "cpu",
        "dtype": dtype_name,
        "threads": args.threads,
        "quick": q,
        "greedy_match": greedy_match,
        "static_ratio": round(static_ours / static_hf, 3),
        "mixed_ratio": round(mixed_ours / mixed_hf, 3),
        "static_tok_s": {"ours": round(static_ours, 1), "hf": round(static_hf, 1)},
        "mixed_tok_s": {"ours": round(mixed_ours, 1), "hf": round(mixed_hf, 1)},
        "static_workload": {"requests": 16, "prompt_tokens": s_len, "output_tokens": s_out},
        "mixed_workload": {"requests": m_n, "prompt_tokens": sum(m_prompt), "output_tokens": sum(m_out),
                           "hf_batch_sizes_tried": hf_batches},
    }
    print(f"greedy match: {greedy_match}")
    print(f"static: ours {static_ours:.1f} tok/s, transformers {static_hf:.1f} tok/s, ratio {result['static_ratio']}")
    print(f"mixed:  ours {mixed_ours:.1f} tok/s, transformers {mixed_hf:.1f} tok/s, ratio {result['mixed_ratio']}")
    if args.vllm_venv:
        result["vllm"] = compare_vllm(args, runner, tok, model.path, dtype_name)
    print(json.dumps(result))


def compare_vllm(args, runner: ModelRunner, tok, model_path: str, dtype_name: str) -> dict:
    """Equal prompts at each batch size through our engine and vLLM's offline engine."""
    p_len, o_len = (128, 32) if args.quick else (256, 64)
    out: dict = {"dtype": dtype_name, "prompt_tokens": p_len, "output_tokens": o_len, "batches": {}}
    for b in (int(x) for x in args.vllm_batches.split(",")):
        prompts = make_prompts(tok, [p_len] * b, args.seed + 3 + b)
        eng = lambda: Engine(runner, EngineConfig(num_blocks=4096, block_size=16, policy="sarathi",  # noqa: E731
                                                  chunk_size=4096, max_num_seqs=256, share_pool=False))
        run_ours(eng(), prompts[:2], [2, 2], "warm-up")
        t_ours, ours = run_ours(eng(), prompts, [o_len] * b, f"batch {b} (ours)")
        v = run_vllm(args.vllm_venv, model_path, dtype_name, prompts, [o_len] * b, p_len + o_len + 16)
        same = sum(a == c for a, c in zip(ours, v["outputs"]))
        row = {"ours_tok_s": round(b * o_len / t_ours, 1), "vllm_tok_s": round(b * o_len / v["elapsed_s"], 1),
               "greedy_equal_requests": f"{same}/{b}", "vllm_version": v["vllm_version"]}
        row["ratio"] = round(row["ours_tok_s"] / row["vllm_tok_s"], 3)
        out["batches"][b] = row
        print(f"vllm batch {b} ({dtype_name}, {p_len} in / {o_len} out): ours {row['ours_tok_s']} tok/s, "
              f"vLLM {row['vllm_tok_s']} tok/s, ratio {row['ratio']}, greedy equal {same}/{b}", flush=True)
    return out


if __name__ == "__main__":
    main()
