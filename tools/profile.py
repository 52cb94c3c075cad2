"""Fit the step-time model on this device and report its error on held-out batches.

    python -m tools.profile [--model tiny|PATH] [--device cpu] [--held-out 40]

Prints the coefficients, then median and p90 absolute percentage error over random
prefill, decode and mixed batches that the fit never saw; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from ascendra.models import resolve_model
from ascendra.perf_model import FEATURES, PerfModel, ape_stats
from workers.model_runner import ModelRunner
from workers.profiler import grid, random_shapes, time_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path, 'tiny', or the embedded SmolLM2 (default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=1024, help="largest prefill in the grid")
    ap.add_argument("--held-out", type=int, default=40, help="random batches to measure the error on")
    args = ap.parse_args()
    m = resolve_model(args.model)
    runner = ModelRunner(m.path, m.name, torch.device(args.device))
    pool = runner.make_pool(args.num_blocks, args.block_size, shareable=False)

    train = grid(args.max_tokens, runner.max_model_len)
    with tqdm(total=len(train), desc="profiling grid") as bar:
        fit = list(time_shapes(runner, pool, args.block_size, train, progress=bar.update))
    model = PerfModel().fit([s for s, _ in fit], [t for _, t in fit])
    test = random_shapes(args.held_out, args.max_tokens, runner.max_model_len)
    with tqdm(total=len(test), desc="held-out batches") as bar:
        held = list(time_shapes(runner, pool, args.block_size, test, reps=1, progress=bar.update))
    stats = ape_stats([model.predict(s) for s, _ in held], [t for _, t in held])
    for name, c in zip(FEATURES, model.coef):
        print(f"  {name:>24s}: {c:.3e} s")
    print(f"held-out error over {stats['n']} batches: median {stats['median_ape_pct']:.1f}%, "
          f"p90 {stats['p90_ape_pct']:.1f}%")
    print(json.dumps({"model": m.name, "device": args.device, "coef": model.to_list(),
                      "fit_points": len(fit), **stats}))


if __name__ == "__main__":
    main()
