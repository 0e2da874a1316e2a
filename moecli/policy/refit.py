"""The cost model refitted online from the executor's own timings.

Each term is a least-squares fit of measured spans against their features, pulled toward the prior model (the host
profile's, or the executor's defaults) as if `weight` (a tenth) of an observation of each prior term alone had been
seen: the fit is defined from the first measurement (decode's collinear tokens = experts included), the prior only
settles what the measurements cannot tell apart, and it converges to the measured costs.

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

class _Ridge:
    """Least squares with `weight` pseudo-observations of each prior term at feature value 1 (ms units)."""

    def __init__(self, prior: list[float], weight: float):
        self.A = weight * np.eye(len(prior))
        self.b = weight * np.asarray(prior, dtype=np.float64)
        self.n = 0

    def add(self, x: list[float], y: float) -> None:
        if not np.isfinite(y) or y < 0:
            return
        x = np.asarray(x, dtype=np.float64)
        self.A += np.outer(x, x)
        self.b += x * y
        self.n += 1

    def terms(self) -> list[float]:
        return np.clip(np.linalg.solve(self.A, self.b), 0.0, None).tolist()


class CostRefit:
    def __init__(self, prior: CostModel, weight: float = 0.1):
        self.prior = prior
        self._cpu = _Ridge([prior.cpu_first, prior.cpu(1) - prior.cpu(0), prior.cpu(0)], weight)
        self._dev = _Ridge([prior.dev_g0, prior.dev_g1], weight)
        self._copy = _Ridge([prior.copy_ms], weight)
        self._dense = _Ridge([prior.dense_fixed, prior.dense_per_tok], weight)
        self._head = _Ridge([prior.head_ms], weight)
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
