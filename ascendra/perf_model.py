"""Predicts one iteration's latency from the batch shape.

Pure code (numpy only; no torch, no I/O, no clock): the coordinator's predictor and the
simulator use it. Features follow the roofline picture of a transformer step:
- a constant (launch and Python overheads),
- prefill tokens (weight-bound matmuls per token),
- prefill attention pairs, sum over chunks of new tokens x attended tokens (quadratic),
- decodes (per-request overheads, sampling, LM head rows),
- decode context tokens (KV bytes read by decode attention).
Fitted by non-negative least squares on profiled steps, then refined online from the
step times the workers report (a sliding window, refitted every few dozen steps).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

FEATURES = ("const", "prefill_tokens", "prefill_attention_pairs", "decodes", "decode_context")


@dataclass(frozen=True)
class BatchShape:
    prefill_tokens: int = 0
    prefill_attention_pairs: int = 0
    decodes: int = 0
    decode_context: int = 0

    def features(self) -> list[float]:
        return [1.0, float(self.prefill_tokens), float(self.prefill_attention_pairs),
                float(self.decodes), float(self.decode_context)]

    @property
    def is_empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decodes == 0


def prefill_shape(num_tokens: int, context: int = 0, decodes: int = 0, decode_context: int = 0) -> BatchShape:
    """The shape of a step that prefills num_tokens after `context` cached tokens."""
    return BatchShape(num_tokens, num_tokens * (context + num_tokens), decodes, decode_context)


class PerfModel:
    def __init__(self, coef: list[float] | None = None, window: int = 2048, refit_every: int = 64) -> None:
        self.coef = np.array(coef if coef else [0.0] * len(FEATURES), dtype=float)
        # The sliding window as a ring buffer: the simulator refits thousands of times per run,
        # and building arrays from lists each time cost more than the fit.
        self._x = np.zeros((window, len(FEATURES)))
        self._y = np.zeros(window)
        self._n = 0  # observations ever added; row n % window is the next to overwrite
        self._since_fit = 0
        self.refit_every = refit_every
        self._rel_errors: deque[float] = deque(maxlen=512)
        self._error_q: dict[float, float] = {}  # cached quantiles, cleared as errors arrive
        self._mean_step = 0.0  # what an unfitted model predicts: the recent average step

    @property
    def coef(self) -> np.ndarray:
        return self._coef

    @coef.setter
    def coef(self, value) -> None:
        self._coef = np.array(value, dtype=float)
        # predict() runs per request per step in the predictor and the simulator: plain floats
        # are several times faster than a numpy dot on five numbers.
        self._c = tuple(float(c) for c in self._coef)
        self._fitted = any(self._c)

    @property
    def fitted(self) -> bool:
        return self._fitted

    # ---- prediction
    def predict(self, shape: BatchShape) -> float:
        if shape.prefill_tokens == 0 and shape.decodes == 0:
            return 0.0
        if not self._fitted:
            return self._mean_step
        c0, c1, c2, c3, c4 = self._c
        t = (c0 + c1 * shape.prefill_tokens + c2 * shape.prefill_attention_pairs + c3 * shape.decodes
             + c4 * shape.decode_context)
        return t if t > 1e-6 else 1e-6

    def prefill_time(self, num_tokens: int, context: int = 0) -> float:
        return self.predict(prefill_shape(num_tokens, context))

    def step_time(self, prefill_tokens: int, decodes: int, decode_context: int = 0, prefill_context: int = 0) -> float:
        return self.predict(prefill_shape(prefill_tokens, prefill_context, decodes, decode_context))

    def error_quantile(self, q: float = 0.9) -> float:
        """Relative error of recent online predictions (0.25 until enough are seen)."""
        if len(self._rel_errors) < 16:
            return 0.25
        cached = self._error_q.get(q)
        if cached is None:
            ordered = sorted(self._rel_errors)  # a few hundred floats: cheaper than numpy here
            cached = self._error_q[q] = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return cached

    # ---- fitting
    def fit(self, shapes: list[BatchShape], seconds: list[float]) -> "PerfModel":
        for s, t in zip(shapes, seconds):
            self._add(s, t)
        self._refit()
        return self

    def observe(self, shape: BatchShape, seconds: float) -> None:
        """One measured step; the model refits itself every `refit_every` observations."""
        if shape.is_empty or seconds <= 0:
            return
        if self.fitted:
            self._rel_errors.append(abs(self.predict(shape) - seconds) / seconds)
            if self._n % 32 == 0:
                self._error_q.clear()  # recompute the quantiles now and then, not every call
        self._mean_step = seconds if not self._mean_step else 0.9 * self._mean_step + 0.1 * seconds
        self._add(shape, seconds)
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self._refit()

    def _refit(self) -> None:
        self._since_fit = 0
        n = min(self._n, len(self._y))
        if n < len(FEATURES):
            return
        x, y = self._x[:n], self._y[:n]
        # Relative error matters (a 10 ms step off by 10 ms is as bad as a 1 s step off by
        # 1 s), so weight each row by 1 / y.
        w = 1.0 / np.maximum(y, 1e-6)
        self.coef = _nnls(x * w[:, None], y * w)

    def _add(self, shape: BatchShape, seconds: float) -> None:
        i = self._n % len(self._y)
        self._x[i] = shape.features()
        self._y[i] = seconds
        self._n += 1

    def to_list(self) -> list[float]:
        return [float(c) for c in self.coef]

    @classmethod
    def from_list(cls, coef: list[float]) -> "PerfModel":
        return cls(list(coef) if coef else None)


def _nnls(a: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Least squares with non-negative coefficients (active-set by elimination).

    Columns are scaled first, since features differ by orders of magnitude.
    """
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
    a_s = a / scale
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    for _ in range(iters):
        sol, *_ = np.linalg.lstsq(a_s[:, active], b, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        # Drop the most negative feature and solve again.
        active.pop(int(np.argmin(sol)))
        if not active:
            break
    return coef / scale


def ape_stats(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """Median and p90 absolute percentage error."""
    err = np.abs(np.array(predicted) - np.array(measured)) / np.maximum(np.array(measured), 1e-9) * 100
    return {"median_ape_pct": float(np.median(err)), "p90_ape_pct": float(np.quantile(err, 0.9)), "n": len(err)}
