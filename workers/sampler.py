"""Next-token choice for each request of a batch: greedy, or temperature / top-k / top-p sampling.

One pass over the whole batch: a temperature column, top-k and top-p masks computed for all
rows at once, one sort, one softmax, and one host transfer of the chosen tokens. Drawing a
token is torch's own single-sample ``multinomial`` (argmax of p / q with q ~ Exp(1)), so a
seeded request consumes exactly the random numbers it did when it was sampled on its own;
only seeded rows draw from their own generator, the others share one draw.

A row that cannot be sampled (non-finite logits, say from a NaN temperature) fails alone:
its slot in the result holds the error, and its batch-mates get their tokens.
"""

from __future__ import annotations

import torch

from ascendra.messages import MAX_LOGPROBS, SamplingParams


class SamplingError(ValueError):
    """This request's row could not be sampled; the request fails, its batch-mates do not."""


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids
        # Test-only fault injection: request ids whose row raises as if its sampling failed.
        self.fail_request_ids: set[str] = set()

    def sample(
        self,
        logits: torch.Tensor,  # [n, vocab], fp32
        params: list[SamplingParams],
        num_outputs: list[int],  # tokens each request has produced so far
        generators: list[torch.Generator | None],
        request_ids: list[str] | None = None,
        histories: list[tuple[list[int], int]] | None = None,  # (prompt + output ids, prompt length)
    ) -> list[int | SamplingError]:
        n, vocab = logits.shape
        out: list[int | SamplingError] = [0] * n
        if n == 0:
            return out
        if histories is not None:
            apply_penalties(logits, params, histories)
        self._ban_stops_below_min_tokens(logits, params, num_outputs)
        for i, rid in enumerate(request_ids or []):
            if rid in self.fail_request_ids or "*" in self.fail_request_ids:
                out[i] = SamplingError(f"injected sampling fault for request {rid!r}")
        dev = logits.device
        greedy = [p.greedy for p in params]
        choice = logits.argmax(dim=-1)
        if not all(greedy):
            temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                                 dtype=logits.dtype).to(dev, non_blocking=True)
            scaled = logits / temps[:, None]
            scaled = self._top_k(scaled, params, greedy, vocab)
            probs = torch.softmax(scaled, dim=-1)
            probs = self._top_p(probs, params, greedy)
            noise = torch.empty_like(probs)
            unseeded = [i for i in range(n) if not greedy[i] and generators[i] is None]
            if unseeded:
                noise.exponential_(1)
            for i in range(n):
                if not greedy[i] and generators[i] is not None:
                    noise[i].exponential_(1, generator=generators[i])
            sampled = (probs / noise).argmax(dim=-1)
            # A usable row has finite, non-negative probabilities with some mass.
            valid = torch.isfinite(probs).all(-1) & (probs >= 0).all(-1) & (probs.sum(-1) > 0)
            is_greedy = torch.tensor(greedy).to(dev, non_blocking=True)
            choice = torch.where(is_greedy, choice, sampled)
            valid = valid | is_greedy
        else:
            valid = torch.ones(n, dtype=torch.bool, device=dev)
        tokens, ok = torch.stack([choice, valid.long()]).tolist()  # the one device -> host sync
        for i in range(n):
            if isinstance(out[i], SamplingError):
                continue
            if not ok[i]:
                p = params[i]
                out[i] = SamplingError(
                    f"sampling produced no valid distribution (temperature={p.temperature}, "
                    f"top_k={p.top_k}, top_p={p.top_p})")
            else:
                out[i] = tokens[i]
        return out

    def _ban_stops_below_min_tokens(self, logits, params, num_outputs) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, (p, n) in enumerate(zip(params, num_outputs)):
            if n < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                rows += [i] * len(banned)
                cols += banned
        if rows:
            logits[torch.tensor(rows), torch.tensor(cols)] = float("-inf")

    @staticmethod
    def _top_k(scaled: torch.Tensor, params, greedy, vocab: int) -> torch.Tensor:
        ks = [p.top_k if not g and 0 < p.top_k < vocab else 0 for p, g in zip(params, greedy)]
        kmax = max(ks)
        if kmax == 0:
            return scaled
        # The k-th largest value of each row; rows without top-k keep everything (-inf).
        top = torch.topk(scaled, kmax, dim=-1).values
        idx = torch.tensor([max(k, 1) - 1 for k in ks]).to(scaled.device, non_blocking=True)
        kth = top.gather(1, idx[:, None])
        off = torch.tensor([k == 0 for k in ks]).to(scaled.device, non_blocking=True)
        kth = kth.masked_fill(off[:, None], float("-inf"))
        return scaled.masked_fill(scaled < kth, float("-inf"))

    @staticmethod
    def _top_p(probs: torch.Tensor, params, greedy) -> torch.Tensor:
        top_p = [p.top_p if not g else 1.0 for p, g in zip(params, greedy)]
        if all(t >= 1.0 for t in top_p):
            return probs
        # Rows without top-p get an infinite limit: rounding in the cumsum must not trim them.
        limit = torch.tensor([t if t < 1.0 else float("inf") for t in top_p],
                             dtype=probs.dtype).to(probs.device, non_blocking=True)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > limit[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[tuple[list[int], int]]) -> None:
    """vLLM's repetition, frequency and presence penalties, in place, for the rows that set any.

    The penalised rows are gathered into one sub-batch: token counts are built with one
    index_put per kind, so the cost is one pass over the histories plus a few [rows, vocab]
    element-wise ops.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return
    dev = logits.device
    seen_r: list[int] = []  # (sub-row, token) of every prompt token (repetition penalty)
    seen_t: list[int] = []
    out_r: list[int] = []  # (sub-row, token) of every output token, with repeats
    out_t: list[int] = []
    for j, i in enumerate(rows):
        ids, n_prompt = histories[i]
        prompt, output = ids[:n_prompt], ids[n_prompt:]
        if params[i].repetition_penalty != 1.0:
            seen_r += [j] * len(prompt)
            seen_t += prompt
        out_r += [j] * len(output)
        out_t += output
    idx = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, idx)
    counts = torch.zeros_like(sub)
    if out_t:
        counts.index_put_((torch.tensor(out_r, device=dev), torch.tensor(out_t, device=dev)),
                          torch.ones(len(out_t), dtype=sub.dtype, device=dev), accumulate=True)
    seen = counts > 0
    if seen_t:
        seen[torch.tensor(seen_r, device=dev), torch.tensor(seen_t, device=dev)] = True
    col = lambda xs: torch.tensor(xs, dtype=sub.dtype).to(dev)[:, None]  # noqa: E731
    rep = col([params[i].repetition_penalty for i in rows])
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - col([params[i].frequency_penalty for i in rows]) * counts
    sub = sub - col([params[i].presence_penalty for i in rows]) * (counts > 0).to(sub.dtype)
    logits.index_copy_(0, idx, sub)


class TokenLogprobs:
    """One sampling row's report: the sampled token's log-probability and the top alternatives."""

    __slots__ = ("logprob", "top_ids", "top_logprobs")

    def __init__(self, logprob: float, top_ids: list[int], top_logprobs: list[float]) -> None:
        self.logprob = logprob
        self.top_ids = top_ids
        self.top_logprobs = top_logprobs


class PendingLogprobs:
    """Log-probabilities of the rows that asked for them, taken from the raw logits.

    Built before sampling, because penalties and the min_tokens ban edit the logits in place;
    resolved after it, once the sampled tokens are known. Only the asking rows are gathered,
    so a batch where no request asked pays nothing, and one that did pays for its rows only.
    """

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        self.rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.ks = [min(params[i].logprobs or 0, MAX_LOGPROBS) for i in self.rows]
        idx = torch.tensor(self.rows).to(logits.device, non_blocking=True)
        self.logprobs = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        kmax = max(self.ks)
        self.top = torch.topk(self.logprobs, kmax, dim=-1) if kmax else None

    @classmethod
    def capture(cls, logits: torch.Tensor, params: list[SamplingParams]) -> "PendingLogprobs | None":
        if all(p.logprobs is None for p in params):
            return None
        return cls(logits, params)

    def resolve(self, tokens: list) -> dict[int, TokenLogprobs]:
        """Row index -> its report, for the rows whose token is an int (a failed row has none)."""
        dev = self.logprobs.device
        chosen = [t if isinstance(t, int) else 0 for t in (tokens[i] for i in self.rows)]
        picked = self.logprobs.gather(1, torch.tensor(chosen).to(dev, non_blocking=True)[:, None])[:, 0]
        parts = [picked[:, None].double()]
        if self.top is not None:  # ids as float64 are exact (vocabularies are far below 2**53)
            parts += [self.top.values.double(), self.top.indices.double()]
        table = torch.cat(parts, dim=1).tolist()  # one device -> host copy for the whole report
        kmax = self.top.values.shape[1] if self.top is not None else 0
        out: dict[int, TokenLogprobs] = {}
        for j, i in enumerate(self.rows):
            if not isinstance(tokens[i], int):
                continue
            row, k = table[j], self.ks[j]
            out[i] = TokenLogprobs(row[0], [int(t) for t in row[1 + kmax:1 + kmax + k]], row[1:1 + k])
        return out
