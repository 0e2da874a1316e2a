"""The cost model refitted online from the executor's own timings.

Each term is a least-squares fit of measured spans against their features, pulled toward the prior model (the host
profile's, or the executor's defaults) as if `weight` (a fiftieth) of an observation of each prior term alone had been
seen: the fit is defined from the first measurement (decode's collinear tokens = experts included), the prior only
settles what the measurements cannot tell apart, and it converges to the measured costs. Older measurements fade
(`forget` per new one, about 20 remembered): costs move under the executor (the prompt's copies read cold pages of
the memory map, decode's read warm ones; the prompt's CPU batches are not decode's), and a cumulative mean would
keep charging decode the prompt's costs (a recorded Qwen3-30B-A3B x4 run: copies 40 ms fitted, 1-3 ms measured).
Terms are non-negative by an active-set solve (a negative term is fixed at 0 and the others refitted), not by
clipping an unconstrained solution, which leaves the other terms fitted to the negative one.

    cpu layer  = first + a·tokens + b·experts        (one ggml graph per layer: only the layer's total is seen)
    device     = g0·experts + g1·tokens
    copy       = copy_ms · copies
    dense      = dense_fixed + dense_per_tok·tokens   (between two experts calls of a pass)
    head       = head_ms                              (last layer of a pass to the first of the next, minus dense)
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from moecli.policy.cost import CostModel

FORGET = 0.95  # per measurement of a term: ~20 measurements remembered


class _Ridge:
    """Least squares with `weight` pseudo-observations of each prior term at feature value 1 (ms units); each new
    observation scales the earlier ones by `forget`."""

    def __init__(self, prior: list[float], weight: float, forget: float = 1.0):
        self.P = weight * np.eye(len(prior))
        self.p = weight * np.asarray(prior, dtype=np.float64)
        self.A = np.zeros_like(self.P)
        self.b = np.zeros_like(self.p)
        self.forget = forget
        self.n = 0

    def add(self, x: list[float], y: float) -> None:
        if not np.isfinite(y) or y < 0:
            return
        x = np.asarray(x, dtype=np.float64)
        self.A = self.forget * self.A + np.outer(x, x)
        self.b = self.forget * self.b + x * y
        self.n += 1

    def terms(self) -> list[float]:
        A, b = self.P + self.A, self.p + self.b
        free = np.ones(len(b), dtype=bool)
        while True:  # active set: terms that come out negative are fixed at 0, the rest refitted
            t = np.zeros(len(b))
            if not free.any():
                return t.tolist()
            t[free] = np.linalg.solve(A[np.ix_(free, free)], b[free])
            if (t >= 0).all():
                return t.tolist()
            free &= t > 0


class CostRefit:
    def __init__(self, prior: CostModel, weight: float = 0.02, forget: float = FORGET):
        self.prior = prior
        self._cpu = _Ridge([prior.cpu_first, prior.cpu(1) - prior.cpu(0), prior.cpu(0)], weight, forget)
        self._dev = _Ridge([prior.dev_g0, prior.dev_g1], weight, forget)
        self._copy = _Ridge([prior.copy_ms], weight, forget)
        self._dense = _Ridge([prior.dense_fixed, prior.dense_per_tok], weight, forget)
        self._head = _Ridge([prior.head_ms], weight, forget)
        self._dense_pending: list[tuple[int, float]] = []

    def cpu(self, experts: int, tokens: int, ms: float) -> None:
        self._cpu.add([1.0, tokens, experts], ms)

    def dev(self, experts: int, tokens: int, ms: float) -> None:
        self._dev.add([experts, tokens], ms)

    def copy(self, copies: int, ms: float) -> None:
        self._copy.add([copies], ms)

    def dense(self, tokens: int, ms: float) -> None:
        self._dense.add([1.0, tokens], ms)

    def head(self, tokens: int, ms: float) -> None:
        """The gap before a pass's first layer: the head of the previous pass, and this layer's dense part."""
        fixed, per_tok = self._dense.terms()
        self._head.add([1.0], ms - fixed - per_tok * tokens)

    @property
    def measurements(self) -> int:
        return self._cpu.n + self._dev.n + self._copy.n + self._dense.n + self._head.n

    def model(self) -> CostModel:
        """The prior with every term that has measurements replaced by its fit."""
        c = self.prior
        kw = {}
        if self._cpu.n:
            kw["cpu_first"], kw["cpu_a"], kw["cpu_b"] = self._cpu.terms()
            kw["cpu_pieces"] = ()
        if self._dev.n:
            kw["dev_g0"], kw["dev_g1"] = self._dev.terms()
        if self._copy.n:
            kw["copy_ms"] = self._copy.terms()[0]
        if self._dense.n:
            kw["dense_fixed"], kw["dense_per_tok"] = self._dense.terms()
        if self._head.n:
            kw["head_ms"] = self._head.terms()[0]
        return replace(c, **kw) if kw else c
