"""Our runtime against transformers' `generate` on the same prompts (SmolLM2 on CPU by default).

    python -m bench.runtime [--quick] [--model PATH|tiny]

Three measurements, side by side in one run:
- greedy_match: our greedy tokens equal transformers' for prompts of different lengths,
  run together with chunked prefill.
- static: 16 equal prompts, equal output lengths: one static batch is transformers' best case.
- mixed: requests of mixed prompt and output lengths. transformers gets the best static
  batching we can give it: requests sorted by output length (an oracle it would not have
  in service) and cut into batches; the best of the tried batch sizes is reported. Only
  requested tokens count as output, for both.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from ascendra.messages import AddRequest, SamplingParams
from ascendra.models import resolve_model
from workers.engine import Engine, EngineConfig
from workers.model_runner import ModelRunner


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path, 'tiny', or the embedded SmolLM2 (default)")
    ap.add_argument("--quick", action="store_true", help="smaller workload, under 3 minutes on 2 cores")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model.path)
    runner = ModelRunner(model.path, model.name, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
