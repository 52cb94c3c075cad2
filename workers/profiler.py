"""Fits the step-time model on this worker's own device by running a grid of batch shapes.

Results are cached per model + device + dtype + block size + runtime revision, so a restart
skips the grid.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from ascendra.block_manager import BlockManager
from ascendra.messages import SamplingParams
from ascendra.models import cache_dir
from ascendra.perf_model import BatchShape, PerfModel, prefill_shape
from ascendra.scheduler import ScheduledSeq
from ascendra.sequence import Sequence
from .device import timed_clock

# Timed repetitions per shape after one warm-up run. On CUDA the median of several damps
# clock and launch jitter; on CPU a call's wall time is its execution time and start-up
# time on shared boxes matters more.
PROFILE_REPS = {"cuda": 5, "cpu": 1}

# Bumped whenever a runtime change moves step times (a fused kernel, a new attention path), so
# a profile fitted on older code is refitted rather than trusted: a stale one over-predicted
# prefill by up to 8% after the CPU MLP was fused, and the schedulers paced to it.
RUNTIME_REVISION = 2

# (prefill chunks as (tokens, context), decodes as context lengths)
Shape = tuple[list[tuple[int, int]], list[int]]


def profile_path(info, device: str, block_size: int, packed: bool = False) -> Path:
    import torch  # CPU step times depend on the thread count and the weights' layout too

    threads = torch.get_num_threads() if device == "cpu" else None
    name = f"{info.name}-{device.replace(':', '')}-{info.dtype}-b{block_size}{profile_suffix(threads, packed)}.json"
    return cache_dir().parent / "profiles" / name.replace("/", "_")


def profile_suffix(threads: int | None, packed: bool) -> str:
    """The end of a profile's file stem: CPU thread count, weight layout, runtime revision (the
    simulator's fidelity check finds the workers' profile by it)."""
    return f"{'' if threads is None else f'-t{threads}'}{'-packed' if packed else ''}-r{RUNTIME_REVISION}"


def grid(max_tokens: int, max_len: int) -> list[Shape]:
    """Prefill-only, decode-only and mixed shapes spanning what the schedulers produce."""
    out: list[Shape] = []
    sizes = [s for s in (8, 32, 64, 128, 256, 512, 1024) if s <= max_tokens]
    for n in sizes:
        out.append(([(n, 0)], []))
        if n + 512 <= max_len:
            out.append(([(n, 512)], []))
    for b in (1, 4, 16, 32, 64):
        for ctx in (32, 256, 1024):
            if ctx < max_len:
                out.append(([], [ctx] * b))
    for n in (32, 128, 384):
        for b in (4, 16):
            out.append(([(n, 0)], [256] * b))
    return out


def random_shapes(count: int, max_tokens: int, max_len: int, seed: int = 1) -> list[Shape]:
    """Held-out shapes for measuring the fit's error."""
    rng = random.Random(seed)
    out: list[Shape] = []
    for _ in range(count):
        kind = rng.choice(["prefill", "decode", "mixed"])
        pre = [] if kind == "decode" else [(rng.randint(8, max_tokens // 2), rng.choice([0, 0, rng.randint(16, 512)]))]
        dec = [] if kind == "prefill" else [rng.randint(16, min(1024, max_len - 2)) for _ in range(rng.randint(1, 48))]
        out.append((pre, dec))
    return out


def shape_of(shape: Shape) -> BatchShape:
    pre, dec = shape
    p = sum(prefill_shape(n, c) .prefill_attention_pairs for n, c in pre)
    return BatchShape(sum(n for n, _ in pre), p, len(dec), sum(c + 1 for c in dec))


def time_shapes(runner, pool, block_size: int, shapes: list[Shape], reps: int = 2,
                progress=None) -> Iterator[tuple[BatchShape, float]]:
    """Run each shape on the real model over the worker's pool; yields (shape, median seconds)."""
    blocks = BlockManager(pool.num_blocks, block_size)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    for shape in shapes:
        pre, dec = shape
        batch: list[ScheduledSeq] = []
        seqs: list[Sequence] = []
        ok = True
        for i, (n, ctx) in enumerate(pre):
            s = Sequence(f"p{i}", [(7 * j) % 1000 + 10 for j in range(ctx + n)], sp, 0.0)
            s.num_computed_tokens = ctx
            seqs.append(s)
            ok &= blocks.grow(s, ctx + n)
            batch.append(ScheduledSeq(s, n, ctx))
        for i, ctx in enumerate(dec):
            s = Sequence(f"d{i}", [(5 * j) % 1000 + 10 for j in range(ctx)], sp, 0.0)
            s.token_ids.append(11)  # one output: the token to decode
            s.num_computed_tokens = ctx
            seqs.append(s)
            ok &= blocks.grow(s, ctx + 1)
            batch.append(ScheduledSeq(s, 1, ctx))
        if ok:
            runner.execute(batch, pool)  # warm-up: allocator and kernel selection, not timed
            times = []
            for _ in range(reps):
                # Both clock reads wait for the device: the time is execution, not launch.
                t = timed_clock(pool.device)
                runner.execute(batch, pool)
                times.append(timed_clock(pool.device) - t)
            yield shape_of(shape), statistics.median(times)
        for s in seqs:
            blocks.release(s)
        if progress is not None:
            progress()


def fit_or_load(runner, pool, device: str, block_size: int, max_tokens: int, log=None) -> PerfModel:
    path = profile_path(runner.info, device, block_size, runner.packed)
    if path.is_file():
        try:
            return PerfModel.from_list(json.loads(path.read_text())["coef"])
        except (ValueError, KeyError):
            pass  # a damaged cache is refitted below
    t0 = time.perf_counter()
    shapes, seconds = [], []
    for shape, t in time_shapes(runner, pool, block_size, grid(max_tokens, runner.max_model_len),
                                  reps=PROFILE_REPS.get(pool.device.type, 1)):
        shapes.append(shape)
        seconds.append(t)
    model = PerfModel().fit(shapes, seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"coef": model.to_list(), "points": len(shapes)}))
    os.replace(tmp, path)
    if log:
        log(f"profiled {len(shapes)} batch shapes in {time.perf_counter() - t0:.1f}s -> {path}")
    return model
