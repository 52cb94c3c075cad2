"""Where simulated time comes from: step-time sources and the KV migration cost.

Step-time sources all answer ``predict(BatchShape) -> seconds`` (the ``PerfModel`` interface),
so the simulator, the schedulers and the coordinator's predictor can use any of them:

- ``PerfModel`` fitted on a real device (a coefficient list, or a profile JSON written by the
  worker's profiler, ``~/.cache/ascendra/profiles/*.json`` = ``{"coef": [...]}``).
- ``OperatorTableCost``: Llama-3-8B on an A100 built from vidur's measured per-layer operator
  times (linear layers, norms, activations) plus an attention term the table lacks: prefill
  attention from its FLOPs at a realistic tensor-core efficiency, decode attention from the KV
  bytes it reads at a realistic share of HBM bandwidth.

- ``SharedHostCost``: CPU workers that share one machine, fitted from a real server's step log
  (``--step-log``): one PerfModel for steps that ran alone, one for steps that ran beside another
  worker's; the simulator picks by how many instances are mid-step.

``MigrationCost`` prices moving KV between instances (bytes / link bandwidth + a fixed latency).
"""

from __future__ import annotations

import bisect
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ascendra.perf_model import BatchShape, PerfModel, prefill_shape

# ../shared next to the repository root (override with the CLI's --shared).
DEFAULT_SHARED = Path(__file__).resolve().parents[2].parent / "shared"
VIDUR_A100_TABLE = DEFAULT_SHARED / "profiles" / "vidur-a100-llama3-8b" / "mlp.csv"
# Per-layer operators in the table; "add" runs twice per layer (two residual adds).
_LAYER_OPS = {"input_layernorm": 1, "attn_pre_proj": 1, "attn_rope": 1, "attn_post_proj": 1,
              "post_attention_layernorm": 1, "mlp_up_proj": 1, "mlp_act": 1, "mlp_down_proj": 1, "add": 2}


@dataclass(frozen=True)
class ModelShape:
    """The parts of a decoder's shape that the cost and memory models use."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_params: float
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


LLAMA3_8B = ModelShape("Llama-3.1-8B", num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8,
                       head_dim=128, vocab=128256, num_params=8.03e9)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bytes_s: float


A100_80GB = GPU("A100-80GB", memory_bytes=80 * 2**30, peak_flops=312e12, hbm_bytes_s=2.0e12)


def kv_pool_blocks(gpu: GPU, model: ModelShape, block_size: int, activation_reserve_bytes: float = 4 * 2**30,
                   memory_utilization: float = 0.9) -> int:
    """KV blocks left after weights and an activation reserve, vLLM-style (90% of memory usable)."""
    free = gpu.memory_bytes * memory_utilization - model.weight_bytes - activation_reserve_bytes
    return max(1, int(free // (model.kv_bytes_per_token * block_size)))


class OperatorTableCost:
    """Step time of Llama-3-8B on one A100 (tensor parallel 1) from vidur's operator table.

    Linear-layer work depends on the batch's token count (prefill tokens + decodes) and is read
    off the table (median columns, interpolated; duplicate rows averaged). Attention is modelled:
    prefill = 4 FLOPs x attended pairs x heads x head_dim per layer at ``flops_eff`` of peak;
    decode = KV bytes read at ``bw_eff`` of HBM bandwidth. The LM head runs on sampled rows
    (weight-read bound for small batches). ``overhead_s`` is the per-step CPU work (scheduling,
    input preparation, sampling) that the GPU table does not see.
    """

    def __init__(self, table: str | Path = VIDUR_A100_TABLE, model: ModelShape = LLAMA3_8B, gpu: GPU = A100_80GB,
                 flops_eff: float = 0.5, bw_eff: float = 0.7, overhead_s: float = 1.5e-3,
                 per_seq_overhead_s: float = 10e-6) -> None:
        self.model, self.gpu = model, gpu
        self.overhead_s, self.per_seq_overhead_s = overhead_s, per_seq_overhead_s
        self._ns, self._layer_s = self._load(Path(table), model)
        self._attn_s_per_pair = 4 * model.num_heads * model.head_dim * model.num_layers / (gpu.peak_flops * flops_eff)
        self._decode_s_per_ctx = model.kv_bytes_per_token / (gpu.hbm_bytes_s * bw_eff)
        self._lm_head_read_s = model.vocab * model.hidden * model.dtype_bytes / (gpu.hbm_bytes_s * bw_eff)
        self._lm_head_row_s = 2 * model.vocab * model.hidden / (gpu.peak_flops * flops_eff)
        self._cache: dict[int, float] = {}

    @staticmethod
    def _load(path: Path, model: ModelShape) -> tuple[list[int], list[float]]:
        """Seconds for all layers + embedding at each measured token count."""
        by_n: dict[int, list[float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if int(row["num_tensor_parallel_workers"]) != 1:
                    continue
                if int(row["n_embd"]) != model.hidden:
                    raise ValueError(f"{path} profiles hidden size {row['n_embd']}, not {model.hidden}")
                per_layer = sum(k * float(row[f"time_stats.{op}.median"]) for op, k in _LAYER_OPS.items())
                total_ms = model.num_layers * per_layer + float(row["time_stats.emb.median"])
                by_n.setdefault(int(row["num_tokens"]), []).append(total_ms / 1e3)
        if not by_n:
            raise ValueError(f"{path} has no tensor-parallel-1 rows")
        ns = sorted(by_n)
        return ns, [sum(by_n[n]) / len(by_n[n]) for n in ns]

    def linear_time(self, n: int) -> float:
        """Seconds of the token-parallel work (everything but attention) for n tokens."""
        t = self._cache.get(n)
        if t is not None:
            return t
        ns, ys = self._ns, self._layer_s
        if n <= ns[0]:
            t = ys[0]
        elif n >= ns[-1]:  # past the table: grow linearly at the last measured slope per token
            t = ys[-1] * n / ns[-1]
        else:
            i = bisect.bisect_left(ns, n)
            if ns[i] == n:
                t = ys[i]
            else:
                n0, n1 = ns[i - 1], ns[i]
                t = ys[i - 1] + (ys[i] - ys[i - 1]) * (n - n0) / (n1 - n0)
        self._cache[n] = t
        return t

    def predict(self, shape: BatchShape) -> float:
        n = shape.prefill_tokens + shape.decodes
        if n == 0:
            return 0.0
        rows = shape.decodes + (1 if shape.prefill_tokens else 0)  # sampled rows, roughly
        lm_head = max(self._lm_head_read_s, rows * self._lm_head_row_s)
        return (self.overhead_s + rows * self.per_seq_overhead_s + self.linear_time(n) + lm_head
                + shape.prefill_attention_pairs * self._attn_s_per_pair
                + shape.decode_context * self._decode_s_per_ctx)

    def prefill_time(self, num_tokens: int, context: int = 0) -> float:
        return self.predict(prefill_shape(num_tokens, context))

    def step_time(self, prefill_tokens: int, decodes: int, decode_context: int = 0, prefill_context: int = 0) -> float:
        return self.predict(prefill_shape(prefill_tokens, prefill_context, decodes, decode_context))


def fit_perf_model(cost, max_prefill: int = 8192, max_decodes: int = 128, max_context: int = 4096,
                   samples: int = 400, seed: int = 0) -> PerfModel:
    """What a worker would learn by profiling a device whose truth is ``cost``: a PerfModel
    (linear in the roofline features) fitted on random prefill, decode and mixed batches."""
    rng = random.Random(seed)
    shapes: list[BatchShape] = []
    for i in range(samples):
        kind = i % 3
        pre = 0 if kind == 1 else rng.choice([rng.randint(1, 512), rng.randint(1, max_prefill)])
        ctx = 0 if rng.random() < 0.6 else rng.randint(0, max_context)
        dec = 0 if kind == 0 else rng.randint(1, max_decodes)
        dctx = dec * rng.randint(16, max_context)
        shapes.append(prefill_shape(pre, ctx, dec, dctx))
    return PerfModel().fit(shapes, [cost.predict(s) for s in shapes])


class SharedHostCost:
    """Step times of instances that share one host's CPU cores.

    On a small CPU two single-thread workers slow each other down (shared caches, memory
    bandwidth, and the cores the coordinator and clients also need), so a step costs more when
    another instance is mid-step. Fitted from the step log a real server wrote under load, which
    also carries what an in-process profile cannot see (the worker loop between steps, wide decode
    batches that fall out of cache)."""

    def __init__(self, alone: PerfModel, beside: PerfModel, loop_s: float = 0.0,
                 width_factors: dict[tuple[int, bool], float] | None = None) -> None:
        self.alone, self.beside, self.loop_s = alone, beside, loop_s
        # Measured / fitted time of logged steps by decode width (see width_factor); empty: none.
        self.width_factors = dict(width_factors or {})
        self.num_alone = self.num_beside = 0  # steps each was fitted on
        # Per logged worker, in time order: each step's measured / fitted time, scaled to mean 1
        # (None: steps take exactly the fit). See with_residuals.
        self.residuals: list[list[float]] | None = None

    def predict(self, shape: BatchShape) -> float:
        return self.predict_shared(shape, 1)

    def predict_shared(self, shape: BatchShape, others_busy: int) -> float:
        """A step that starts while `others_busy` other instances on the host are mid-step."""
        if shape.is_empty:
            return 0.0
        model = self.alone if others_busy == 0 else self.beside
        return model.predict(shape) * self.width_factor(shape) + self.loop_s

    def width_factor(self, shape: BatchShape) -> float:
        """How much slower than the linear fit the host ran steps of this decode width.

        The fit is linear in the number of decodes, the host is not: on the 2-core CPU, steps of
        16-31 decodes ran 1.3-1.4x what the fit gives (their activations and KV fall out of
        cache), and those are the steps a loaded instance runs, so a linear fit made the
        simulator's baselines look up to 1.7x faster than the server they were fitted on. Steps
        wider than any the log holds enough of take the widest measured bin's factor."""
        if not self.width_factors:
            return 1.0
        key = _width_bin(shape.decodes, shape.prefill_tokens > 0)
        for b in range(key[0], -1, -1):
            factor = self.width_factors.get((b, key[1]))
            if factor is not None:
                return factor
        return 1.0

    @classmethod
    def fit(cls, steps: list[dict], min_steps: int = 40) -> "SharedHostCost":
        """steps: step-log records ({"worker", "prefill", "pairs", "decode", "decode_context",
        "step_time", "end"}; seconds on one monotonic clock)."""
        if len(steps) < min_steps:
            raise ValueError(f"{len(steps)} logged steps; at least {min_steps} are needed to fit")
        alone, beside, gaps = _split_steps(steps)

        def fit(rows: list[dict]) -> PerfModel:
            shapes = [_shape(r) for r in rows]
            times = [r["step_time"] for r in rows]
            model = PerfModel(window=max(len(rows), 1)).fit(shapes, times)
            # The fit weighs relative error, which favours the many short steps; rescale it so it
            # also reproduces the total busy time, which is what queueing in the simulator sees.
            predicted = sum(model.predict(x) for x in shapes)
            return PerfModel.from_list([c * sum(times) / predicted for c in model.to_list()]) if predicted > 0 else model

        both = fit(alone + beside)
        cost = cls(fit(alone) if len(alone) >= min_steps else both, fit(beside) if len(beside) >= min_steps else both,
                   sum(gaps) / len(gaps) if gaps else 0.0)
        cost.num_alone, cost.num_beside = len(alone), len(beside)
        # Per decode width, measured over fitted time (bins of WIDTH_BIN decodes, with and
        # without prefill, each from at least MIN_BIN_STEPS logged steps).
        linear = cost._fitted_split(alone, beside)  # width factors still empty: the linear fit
        sums: dict[tuple[int, bool], list[float]] = {}
        for r, model_s in linear:
            acc = sums.setdefault(_width_bin(r["decode"], r["prefill"] > 0), [0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += r["step_time"]
            acc[2] += model_s
        cost.width_factors = {k: a / f for k, (n, a, f) in sums.items() if n >= MIN_BIN_STEPS and f > 0}
        # Steps in bins too thin to measure borrowed a neighbour's factor: rescale so that the
        # total busy time is still the logged one.
        fitted = sum(t * cost.width_factor(_shape(r)) for r, t in linear)
        if cost.width_factors and fitted > 0:
            scale = sum(r["step_time"] for r in steps) / fitted
            cost.width_factors = {k: f * scale for k, f in cost.width_factors.items()}
        return cost

    def with_residuals(self, steps: list[dict]) -> "SharedHostCost":
        """The same fit, plus how the logged steps strayed from it, for the simulator to replay.

        A real host's steps are neither exact nor independent: on the 2-core CPU they stray by
        ~14% (sd) from the fit and stay high or low for tens of steps (the box's phases), which
        is what tips paced decodes over a TBT objective. A smooth fit hides that."""
        by_worker: dict[int, list[tuple[float, float]]] = {}
        for r, model_s in self._fitted(steps):
            fitted = model_s + self.loop_s
            if fitted > 0 and r["step_time"] > 0:
                by_worker.setdefault(r["worker"], []).append((r["end"], r["step_time"] / fitted))
        series = []
        for rows in by_worker.values():
            rows.sort()
            ratios = [q for _, q in rows]
            mean = sum(ratios) / len(ratios)
            series.append([q / mean for q in ratios])
        if not series:
            raise ValueError("no logged step to take residuals from")
        cost = self.scaled(1.0)
        cost.residuals = series
        return cost

    def _fitted(self, steps: list[dict]) -> list[tuple[dict, float]]:
        """Each logged step with the time its model (alone or beside) gives it, worker loop aside."""
        alone, beside, _ = _split_steps(steps)
        return self._fitted_split(alone, beside)

    def _fitted_split(self, alone: list[dict], beside: list[dict]) -> list[tuple[dict, float]]:
        out = []
        for model, rows in ((self.alone, alone), (self.beside, beside)):
            for r in rows:
                shape = _shape(r)
                out.append((r, model.predict(shape) * self.width_factor(shape)))
        return out

    def speed_ratio(self, steps: list[dict]) -> float:
        """Measured over predicted time of logged steps (>1: the host ran slower than when fitted)."""
        fitted = self._fitted(steps)
        predicted = sum(t for _, t in fitted)
        return sum(r["step_time"] for r, _ in fitted) / predicted if predicted > 0 else 1.0

    def scaled(self, factor: float) -> "SharedHostCost":
        """The same host running `factor` times slower (the worker loop unchanged)."""
        cost = SharedHostCost(PerfModel.from_list([c * factor for c in self.alone.to_list()]),
                              PerfModel.from_list([c * factor for c in self.beside.to_list()]), self.loop_s,
                              self.width_factors)
        cost.num_alone, cost.num_beside = self.num_alone, self.num_beside
        return cost


# SharedHostCost.width_factor: decodes per bin, and the logged steps a bin needs to be measured.
WIDTH_BIN = 8
MIN_BIN_STEPS = 30


def _width_bin(decodes: int, has_prefill: bool) -> tuple[int, bool]:
    return decodes // WIDTH_BIN, has_prefill


def _shape(r: dict) -> BatchShape:
    return BatchShape(r["prefill"], r["pairs"], r["decode"], r["decode_context"])


def _split_steps(steps: list[dict]) -> tuple[list[dict], list[dict], list[float]]:
    """Logged steps that ran alone, those that ran beside another worker's (other workers' steps
    covered at least half of them), and the gaps between a worker's back-to-back steps."""
    starts: dict[int, list[tuple[float, float]]] = {}
    for r in steps:
        starts.setdefault(r["worker"], []).append((r["end"] - r["step_time"], r["end"]))
    for spans in starts.values():
        spans.sort()
    alone: list[dict] = []
    beside: list[dict] = []
    for r in steps:
        t0, t1 = r["end"] - r["step_time"], r["end"]
        covered = 0.0
        for w, spans in starts.items():
            if w == r["worker"]:
                continue
            i = max(0, bisect.bisect_left(spans, (t0, t0)) - 1)  # one worker's steps never overlap
            while i < len(spans) and spans[i][0] < t1:
                covered += max(0.0, min(t1, spans[i][1]) - max(t0, spans[i][0]))
                i += 1
        (beside if covered >= 0.5 * (t1 - t0) else alone).append(r)
    gaps = [b0 - a1 for spans in starts.values() for (_, a1), (b0, _) in zip(spans, spans[1:])
            if 0.0 <= b0 - a1 < 0.005]  # longer: idle between requests
    return alone, beside, gaps


def read_step_log(path: str | Path) -> list[dict]:
    """A server's --step-log: one dict per worker step."""
    return [json.loads(line) for line in Path(path).expanduser().read_text().splitlines() if line.strip()]


def load_profile(path: str | Path) -> PerfModel:
    """A profile JSON ({"coef": [...]}; tools.profile's last line fits too) or a bare list."""
    data = json.loads(Path(path).expanduser().read_text().strip().splitlines()[-1])
    coef = data["coef"] if isinstance(data, dict) else data
    model = PerfModel.from_list([float(c) for c in coef])
    if not model.fitted:
        raise ValueError(f"{path}: the profile's coefficients are all zero")
    return model


def profile_files() -> list[Path]:
    from ascendra.models import cache_dir

    return sorted((cache_dir().parent / "profiles").glob("*.json"))


@dataclass(frozen=True)
class MigrationCost:
    """Moving KV between instances: fixed latency + bytes / link bandwidth.

    The default is PCIe 4.0 x16 between two A100s (~25 GB/s achieved); NVLink (A100 SXM)
    moves ~200-300 GB/s.
    """

    kv_bytes_per_token: int
    block_size: int = 16
    bandwidth_bytes_s: float = 25e9
    latency_s: float = 1e-3

    def blocks_time(self, num_blocks: int) -> float:
        if num_blocks <= 0:
            return 0.0
        return self.latency_s + num_blocks * self.block_size * self.kv_bytes_per_token / self.bandwidth_bytes_s


LINKS = {"pcie4": 25e9, "pcie5": 50e9, "nvlink3": 250e9}


def make_cost(spec: str, shared: Path | None = None, step_noise: bool = False):
    """--cost a100 | profile:PATH | coef:[...] | steplog:PATH -> a PerfModel-compatible step-time source.

    step_noise (steplog only): the simulator replays the logged steps' deviations from the fit."""
    if step_noise and not spec.startswith("steplog:"):
        raise ValueError("step noise is taken from a step log: use it with --cost steplog:PATH")
    if spec == "a100":
        table = (shared / "profiles" / "vidur-a100-llama3-8b" / "mlp.csv") if shared else VIDUR_A100_TABLE
        return OperatorTableCost(table)
    if spec.startswith("profile:"):
        return load_profile(spec.split(":", 1)[1])
    if spec.startswith("coef:"):
        coef = json.loads(spec.split(":", 1)[1])
        return PerfModel.from_list([float(c) for c in coef])
    if spec.startswith("steplog:"):  # a server's --step-log
        steps = read_step_log(spec.split(":", 1)[1])
        cost = SharedHostCost.fit(steps)
        return cost.with_residuals(steps) if step_noise else cost
    raise ValueError(f"unknown cost source {spec!r}: use a100, profile:PATH, coef:[...] or steplog:PATH")


def linear_fns(model: PerfModel):
    """Plain-Python closures over a fitted PerfModel's coefficients (the scheduler calls these
    once per waiting request per step, so they must not go through numpy)."""
    c0, c1, c2, c3, c4 = (float(c) for c in model.coef)

    def prefill_time(n: int) -> float:
        return c0 + c1 * n + c2 * n * n

    def step_time_fn(avg_context: list[float]):
        def step_time(prefill: int, decodes: int) -> float:
            return c0 + c1 * prefill + c2 * prefill * prefill + decodes * (c3 + c4 * avg_context[0])
        return step_time

    return prefill_time, step_time_fn


def fmt_coef(model: PerfModel) -> str:
    return "[" + ", ".join(f"{c:.3e}" for c in model.coef) + "]"


__all__ = ["A100_80GB", "GPU", "LINKS", "LLAMA3_8B", "MigrationCost", "ModelShape", "OperatorTableCost",
           "SharedHostCost", "fit_perf_model", "kv_pool_blocks", "linear_fns", "load_profile", "make_cost", "profile_files"]

