"""Workload generation: when each request is sent and how long its prompt and output are.

Pure and seeded: the same arguments and seed always give the same requests, so different
servers (or policies) see identical workloads. The only I/O is `load_trace`, which reads a
file and hands its lines to the pure `parse_trace`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

# Token ids used for synthetic prompts. Low ids hold special/control tokens in most
# vocabularies and every common vocabulary (GPT-2, Llama 2/3, Mistral, Qwen, SmolLM) has
# more than 20k ids, so this range is ordinary text tokens everywhere.
PROMPT_ID_RANGE = (1000, 20000)

# Common words that are one token each (with their leading space) in BPE vocabularies;
# used for text prompts when a server rejects token-id prompts. Token counts are then
# approximate; the server's usage tells the real count.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an had they you were their one all we can her has there been if more when "
    "will would who so no she other its may these about them than some time into only new two "
    "could first any after like over our also most made many before must well"
).split()

# Published ShareGPT statistics (vLLM paper, Kwon et al. SOSP'23, Table 1 / Fig. 11): mean
# prompt 161 tokens, mean output 338 tokens. The spread (sigma) is our assumption, chosen for
# the long tail ShareGPT shows; pairs are redrawn until prompt + output < 2048.
SHAREGPT_PROMPT_MEAN = 161.0
SHAREGPT_OUTPUT_MEAN = 338.0
SHAREGPT_SIGMA_PROMPT = 1.0
SHAREGPT_SIGMA_OUTPUT = 0.8
SHAREGPT_MAX_TOTAL = 2048

# LongBench (Bai et al., ACL 2024, arXiv 2308.14508): its English tasks average 6,711 words of
# context. At ~1.3 tokens a word (our assumption for Llama-family tokenizers) that is ~8,700
# tokens; LongBench's own evaluation truncates a prompt in the middle to fit the model's window,
# so prompts are drawn lognormal around that mean (spread: our assumption) and truncated to
# max_model_len minus the output. Outputs: short answers for QA, few-shot, synthetic and code
# tasks (LongBench caps them at 32-128 tokens), summaries for the summarisation tasks (capped
# at 512); the split and the spreads are our assumptions.
LONGBENCH_WORDS_MEAN = 6711
TOKENS_PER_WORD = 1.3
LONGBENCH_SIGMA_PROMPT = 0.6
LONGBENCH_SUMMARY_SHARE = 0.2  # 3 of LongBench's 14 English tasks are summarisation
LONGBENCH_ANSWER_MEAN, LONGBENCH_ANSWER_MAX = 48.0, 128
LONGBENCH_SUMMARY_MEAN, LONGBENCH_SUMMARY_MAX = 300.0, 512
DEFAULT_MAX_MODEL_LEN = 8192

# Code completion like the Azure LLM inference trace's code service (Patel et al., Splitwise,
# ISCA 2024): long prompts (median ~1,500 tokens), very short outputs (median ~13 tokens).
# Lognormal around those medians; the spreads are our assumptions.
CODE_PROMPT_MEDIAN, CODE_SIGMA_PROMPT = 1500.0, 0.8
CODE_OUTPUT_MEDIAN, CODE_SIGMA_OUTPUT = 13.0, 1.0


@dataclass(frozen=True)
class RequestSpec:
    index: int
    arrival_s: float  # send offset from the start of the run
    prompt_len: int
    output_len: int
    # This request's own objectives; None means the run's (simulator only).
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None


@dataclass(frozen=True)
class TraceRow:
    offset_s: float  # seconds since the first row
    prompt_len: int
    output_len: int


# ------------------------------------------------------------------ traces


def _parse_time(s: str) -> float:
    """Azure TIMESTAMP ('2023-11-16 18:15:46.6805900', 7 fractional digits) or plain seconds."""
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    date_part, _, frac = s.partition(".")
    base = datetime.strptime(date_part, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def parse_trace(lines: Iterable[str]) -> list[TraceRow]:
    """Parse an Azure-format CSV (TIMESTAMP, ContextTokens, GeneratedTokens), sorted by time."""
    it = iter(lines)
    header = [h.strip() for h in next(it).split(",")]
    try:
        ti, pi, oi = (header.index(c) for c in ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    except ValueError as e:
        raise ValueError(f"trace header {header} lacks TIMESTAMP/ContextTokens/GeneratedTokens") from e
    raw: list[tuple[float, int, int]] = []
    for line in it:
        if not line.strip():
            continue
        cols = line.split(",")
        raw.append((_parse_time(cols[ti]), int(cols[pi]), int(cols[oi])))
    raw.sort(key=lambda x: x[0])
    if not raw:
        return []
    t0 = raw[0][0]
    return [TraceRow(t - t0, p, o) for t, p, o in raw]


def load_trace(path: str | Path) -> list[TraceRow]:
    with open(path, newline="") as f:
        return parse_trace(f)


def trace_rate(offsets: Sequence[float]) -> float:
    """Mean request rate of a sequence of send offsets ((n - 1) / span)."""
    if len(offsets) < 2 or offsets[-1] <= offsets[0]:
        return math.inf
    return (len(offsets) - 1) / (offsets[-1] - offsets[0])


def rescale_times(offsets: Sequence[float], rate: float) -> list[float]:
    """Stretch or squeeze offsets uniformly so their mean rate is `rate`. Relative timing
    (bursts, lulls) is kept; the first request stays at 0."""
    if not offsets:
        return []
    base = offsets[0]
    if rate == math.inf:
        return [0.0] * len(offsets)
    own = trace_rate(offsets)
    factor = 1.0 if own == math.inf else own / rate
    return [(t - base) * factor for t in offsets]


# ------------------------------------------------------------------ arrivals


def unit_gaps(n: int, burstiness: float, rng: random.Random) -> list[float]:
    """n inter-arrival gaps with mean 1: gamma with shape = burstiness (1 = Poisson).
    Dividing by a rate gives that rate, so sweeps over rates share one random draw."""
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    return [rng.gammavariate(burstiness, 1.0 / burstiness) for _ in range(n)]


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send offsets for n requests at `rate` req/s; the first one is sent at 0."""
    if rate == math.inf:
        return [0.0] * n
    out, t = [], 0.0
    for i, g in enumerate(unit_gaps(n, burstiness, rng)):
        if i:
            t += g / rate
        out.append(t)
    return out


# ------------------------------------------------------------------ lengths


def fixed_lengths(n: int, prompt_len: int, output_len: int) -> list[tuple[int, int]]:
    return [(prompt_len, output_len)] * n


def uniform_lengths(n: int, prompt_len: int, output_len: int, range_ratio: float,
                    rng: random.Random) -> list[tuple[int, int]]:
    """Uniform in [x * (1 - r), x * (1 + r)] around the given means."""
    def draw(x: int) -> int:
        lo, hi = max(1, round(x * (1 - range_ratio))), max(1, round(x * (1 + range_ratio)))
        return rng.randint(lo, hi)
    return [(draw(prompt_len), draw(output_len)) for _ in range(n)]


def _lognormal(rng: random.Random, m: float, sigma: float) -> int:
    mu = math.log(m) - sigma * sigma / 2  # so that the mean is m
    return max(1, round(rng.lognormvariate(mu, sigma)))


def sharegpt_lengths(n: int, rng: random.Random,
                     max_total: int = SHAREGPT_MAX_TOTAL) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        p = _lognormal(rng, SHAREGPT_PROMPT_MEAN, SHAREGPT_SIGMA_PROMPT)
        o = _lognormal(rng, SHAREGPT_OUTPUT_MEAN, SHAREGPT_SIGMA_OUTPUT)
        if p + o < max_total:
            out.append((p, o))
    return out


def longbench_lengths(n: int, rng: random.Random,
                      max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> list[tuple[int, int]]:
    """Long-document prompts truncated to the window, short answers or summaries (see above)."""
    out = []
    prompt_mean = LONGBENCH_WORDS_MEAN * TOKENS_PER_WORD
    for _ in range(n):
        if rng.random() < LONGBENCH_SUMMARY_SHARE:
            o = min(_lognormal(rng, LONGBENCH_SUMMARY_MEAN, 0.5), LONGBENCH_SUMMARY_MAX)
        else:
            o = min(_lognormal(rng, LONGBENCH_ANSWER_MEAN, 0.8), LONGBENCH_ANSWER_MAX)
        p = min(_lognormal(rng, prompt_mean, LONGBENCH_SIGMA_PROMPT), max_model_len - o)
        out.append((p, o))
    return out


def code_lengths(n: int, rng: random.Random,
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> list[tuple[int, int]]:
    """Code completion: long prompts, outputs of a few tokens (see above)."""
    out = []
    for _ in range(n):
        o = max(1, round(rng.lognormvariate(math.log(CODE_OUTPUT_MEDIAN), CODE_SIGMA_OUTPUT)))
        o = min(o, 512)
        p = max(1, round(rng.lognormvariate(math.log(CODE_PROMPT_MEDIAN), CODE_SIGMA_PROMPT)))
        out.append((min(p, max_model_len - o), o))
    return out


def burstiness_for_cv(cv: float) -> float:
    """Gamma shape giving inter-arrival gaps with this coefficient of variation (CV 1 = Poisson)."""
    if cv <= 0:
        raise ValueError("cv must be > 0")
    return 1.0 / (cv * cv)


def assign_slo_classes(specs: Sequence[RequestSpec], classes: Sequence[tuple[float, float, float]],
                       seed: int) -> list[RequestSpec]:
    """Give each request its own objectives: classes are (share, ttft_s, tbt_s), shares summing
    to 1, drawn per request from a stream of its own (lengths and arrivals stay as they were)."""
    total = sum(c[0] for c in classes)
    if not classes or abs(total - 1.0) > 1e-6 or any(c[0] < 0 for c in classes):
        raise ValueError(f"SLO class shares must be non-negative and sum to 1, got {total}")
    rng = random.Random(seed + 2)
    out = []
    for s in specs:
        u, acc = rng.random(), 0.0
        chosen = classes[-1]  # rounding can leave u just above the last cumulative share
        for c in classes:
            acc += c[0]
            if u < acc:
                chosen = c
                break
        out.append(replace(s, ttft_slo_s=chosen[1], tbt_slo_s=chosen[2]))
    return out


def scale_lengths(pairs: Iterable[tuple[int, int]], prompt_scale: float = 1.0,
                  output_scale: float = 1.0, max_prompt_len: int | None = None,
                  max_output_len: int | None = None) -> list[tuple[int, int]]:
    """Shrink lengths for slow hardware: multiply, then clip; never below 1 token."""
    out = []
    for p, o in pairs:
        p2 = max(1, round(p * prompt_scale))
        o2 = max(1, round(o * output_scale))
        if max_prompt_len:
            p2 = min(p2, max_prompt_len)
        if max_output_len:
            o2 = min(o2, max_output_len)
        out.append((p2, o2))
    return out


# ------------------------------------------------------------------ whole workloads


@dataclass(frozen=True)
class WorkloadConfig:
    dataset: str = "fixed"  # fixed | uniform | sharegpt | longbench | code | trace
    num_requests: int | None = None
    duration_s: float | None = None  # stop generating requests at this send time
    rate: float | None = None  # None: the trace's own timing (required for synthetic sets)
    burstiness: float = 1.0
    arrivals: str = "auto"  # auto | trace | poisson (poisson covers gamma via burstiness)
    prompt_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.5
    trace_start: int = 0  # first trace row to use
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    seed: int = 0
    # Per-request objectives: (share, ttft_s, tbt_s) per class; empty = the run's defaults.
    slo_classes: tuple[tuple[float, float, float], ...] = ()
    max_model_len: int = DEFAULT_MAX_MODEL_LEN  # longbench / code prompts are truncated to fit


DEFAULT_NUM_REQUESTS = 100


def build_workload(cfg: WorkloadConfig, trace: Sequence[TraceRow] | None = None) -> list[RequestSpec]:
    """The requests of one run, in send order."""
    rng = random.Random(cfg.seed)
    n = cfg.num_requests
    if n is None and cfg.duration_s is None:
        n = None if cfg.dataset == "trace" else DEFAULT_NUM_REQUESTS
    use_trace_times = cfg.dataset == "trace" and cfg.arrivals in ("auto", "trace")

    if cfg.dataset == "trace":
        if trace is None:
            raise ValueError("dataset 'trace' needs trace rows")
        rows = list(trace[cfg.trace_start:])
        if n is not None:
            rows = rows[:n]
        pairs = [(r.prompt_len, r.output_len) for r in rows]
        if use_trace_times:
            offs = [r.offset_s for r in rows]
            times = rescale_times(offs, cfg.rate) if cfg.rate else [t - offs[0] for t in offs]
            if cfg.duration_s is not None:
                keep = sum(1 for t in times if t < cfg.duration_s)
                pairs, times = pairs[:keep], times[:keep]
    else:
        if cfg.rate is None:
            raise ValueError(f"dataset '{cfg.dataset}' needs --rate (use inf for all at once)")
        if n is None:
            # Enough draws to cover the duration; trimmed below.
            n = (math.ceil(cfg.rate * cfg.duration_s * 3 + 20) if cfg.rate != math.inf
                 else DEFAULT_NUM_REQUESTS)
        if cfg.dataset == "fixed":
            pairs = fixed_lengths(n, cfg.prompt_len, cfg.output_len)
        elif cfg.dataset == "uniform":
            pairs = uniform_lengths(n, cfg.prompt_len, cfg.output_len, cfg.range_ratio, rng)
        elif cfg.dataset == "sharegpt":
            pairs = sharegpt_lengths(n, rng)
        elif cfg.dataset == "longbench":
            pairs = longbench_lengths(n, rng, cfg.max_model_len)
        elif cfg.dataset == "code":
            pairs = code_lengths(n, rng, cfg.max_model_len)
        else:
            raise ValueError(f"unknown dataset {cfg.dataset!r}")

    if not use_trace_times:
        if cfg.rate is None:
            raise ValueError("arrivals 'poisson' need --rate")
        # Separate stream so lengths do not change when only the arrival process changes.
        times = arrival_times(len(pairs), cfg.rate, cfg.burstiness, random.Random(cfg.seed + 1))
        if cfg.duration_s is not None:
            keep = sum(1 for t in times if t < cfg.duration_s)
            pairs, times = pairs[:keep], times[:keep]

    pairs = scale_lengths(pairs, cfg.prompt_scale, cfg.output_scale, cfg.max_prompt_len,
                          cfg.max_output_len)
    specs = [RequestSpec(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(times, pairs))]
    return assign_slo_classes(specs, cfg.slo_classes, cfg.seed) if cfg.slo_classes else specs


# ------------------------------------------------------------------ prompts


def _prompt_rng(seed: int, index: int) -> random.Random:
    # Per-request stream: a request's prompt depends only on (seed, index), not on the
    # lengths of the requests before it.
    return random.Random(seed * 1_000_003 + index)


def prompt_token_ids(seed: int, index: int, length: int) -> list[int]:
    rng = _prompt_rng(seed, index)
    lo, hi = PROMPT_ID_RANGE
    return [rng.randrange(lo, hi) for _ in range(length)]


def prompt_text(seed: int, index: int, length: int) -> str:
    """About `length` tokens of text (one common word per token)."""
    rng = _prompt_rng(seed, index)
    return "".join(" " + rng.choice(_WORDS) for _ in range(length)).lstrip()
