"""Build an in-process engine and run requests to completion (tests and benchmarks)."""

from __future__ import annotations

import time

import torch

from ascendra.messages import AddRequest, SamplingParams
from workers.engine import Engine, EngineConfig
from workers.model_runner import ModelRunner

_RUNNERS: dict[str, ModelRunner] = {}


def runner_for(model) -> ModelRunner:
    # Loading weights is the slow part; tests share one runner per model. fp32, whatever the
    # CPU's default: these tests hold the runtime to transformers' fp32 reference exactly.
    if model.path not in _RUNNERS:
        _RUNNERS[model.path] = ModelRunner(model.path, model.name, torch.device("cpu"), torch.float32)
    return _RUNNERS[model.path]


def make_engine(model, **overrides) -> Engine:
    cfg = dict(num_blocks=256, block_size=16, policy="sarathi", chunk_size=64, scatter_seed=7)
    cfg.update(overrides)
    return Engine(runner_for(model), EngineConfig(**cfg))


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def run_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams):
    """Add every prompt at once, step until done; returns (token ids per request, finish reasons)."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        tokens[rid] = []
        rejected = engine.add_request(AddRequest(rid, p, sp, time.monotonic()))
        if rejected is not None:
            reasons[rid] = rejected.finish_reason
    while engine.has_work():
        for out in engine.step().outputs:
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    return [tokens[f"r{i}"] for i in range(len(prompts))], [reasons.get(f"r{i}") for i in range(len(prompts))]
