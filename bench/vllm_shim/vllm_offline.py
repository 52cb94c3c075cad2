"""Run vLLM's offline engine on token-id prompts; executed by bench.runtime with the vLLM venv's python.

    VENV/bin/python bench/vllm_shim/vllm_offline.py JOB.json

JOB.json: {"model": dir, "dtype": "float32"|"bfloat16", "prompts": [[ids]], "output_lens": [n],
"max_model_len": int, "engine_args": {...}}. Every request is greedy with ignore_eos and exactly
its output length, like ours. One warm-up generate, then the timed one. The stdout line starting
with MARKER carries one JSON object: {"elapsed_s", "outputs": [[ids]], "vllm_version"}.
This file runs only inside the vLLM venv; the project never imports vllm.
"""

from __future__ import annotations

import json
import sys
import time

MARKER = "VLLM_OFFLINE_RESULT "  # vLLM logs to stdout too: the result is the line with this prefix


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0,
              **job.get("engine_args", {}))

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)

    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:2], [params(2)] * 2, use_tqdm=False)  # warm-up (graph capture, allocator)
    start = time.perf_counter()
    outs = llm.generate(prompts, [params(n) for n in job["output_lens"]], use_tqdm=False)
    elapsed = time.perf_counter() - start
    print(MARKER + json.dumps({"elapsed_s": elapsed, "outputs": [list(o.outputs[0].token_ids) for o in outs],
                      "vllm_version": vllm.__version__}))


if __name__ == "__main__":
    main()
