"""Next-token choice for each request of a batch: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from ascendra.messages import SamplingParams


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def sample(
        self,
        logits: torch.Tensor,  # [n, vocab], fp32
        params: list[SamplingParams],
        num_outputs: list[int],  # tokens each request has produced so far
        generators: list[torch.Generator | None],
    ) -> list[int]:
        self._ban_stops_below_min_tokens(logits, params, num_outputs)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        out = [0] * len(params)
        if greedy:
            ids = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, ids):
                out[i] = t
        for i, p in enumerate(params):
            if not p.greedy:
                out[i] = self._sample_row(logits[i], p, generators[i])
        return out

    def _ban_stops_below_min_tokens(self, logits, params, num_outputs) -> None:
        for i, (p, n) in enumerate(zip(params, num_outputs)):
            if n < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
        row = row / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator).item())
