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


class _Terms:
    """One regime's fits of the cost model's terms."""

    def __init__(self, prior: CostModel, weight: float, forget: float):
        self.cpu = _Ridge([prior.cpu_first, prior.cpu(1) - prior.cpu(0), prior.cpu(0)], weight, forget)
        self.dev = _Ridge([prior.dev_g0, prior.dev_g1], weight, forget)
        self.copy = _Ridge([prior.copy_ms], weight, forget)
        self.dense = _Ridge([prior.dense_fixed, prior.dense_per_tok], weight, forget)
        self.head = _Ridge([prior.head_ms], weight, forget)

    @property
    def n(self) -> int:
        return self.cpu.n + self.dev.n + self.copy.n + self.dense.n + self.head.n


class CostRefit:
    """Prompts and decode are fitted apart (`begin_pass` says which a pass is): a prompt's experts see many tokens
    each and its copies read cold pages, decode's one token each and warm pages, and one fit serving both would
    carry decode's state into the next prompt's plan (measured: a prompt predicted at 0.26x its time). Each
    measurement goes to the current pass's regime unless `prompt` says otherwise (a CPU span timed on the worker
    may arrive after the next pass began); the head (one token's logits after either) is one term for both."""

    def __init__(self, prior: CostModel, weight: float = 0.02, forget: float = FORGET):
        self.prior = prior
        self._terms = {False: _Terms(prior, weight, forget), True: _Terms(prior, weight, forget)}
        self.prompt = False  # the current pass's regime

    def begin_pass(self, n_tokens: int) -> None:
        self.prompt = n_tokens > 1

    def _t(self, prompt: bool | None) -> _Terms:
        return self._terms[self.prompt if prompt is None else prompt]

    def cpu(self, experts: int, tokens: int, ms: float, prompt: bool | None = None) -> None:
        self._t(prompt).cpu.add([1.0, tokens, experts], ms)

    def dev(self, experts: int, tokens: int, ms: float) -> None:
        self._t(None).dev.add([experts, tokens], ms)

    def copy(self, copies: int, ms: float) -> None:
        self._t(None).copy.add([copies], ms)

    def dense(self, tokens: int, ms: float) -> None:
        self._t(tokens > 1).dense.add([1.0, tokens], ms)

    def head(self, tokens: int, ms: float) -> None:
        """The gap before a pass's first layer: the head of the previous pass, and this layer's dense part."""
        fixed, per_tok = self._t(tokens > 1).dense.terms()
        self._terms[False].head.add([1.0], ms - fixed - per_tok * tokens)

    @property
    def measurements(self) -> int:
        return sum(t.n for t in self._terms.values())

    def model(self, prompt: bool | None = None) -> CostModel:
        """The prior with every term that has measurements in this regime (the current pass's by default) replaced
        by its fit."""
        t, kw = self._t(prompt), {}
        if t.cpu.n:
            kw["cpu_first"], kw["cpu_a"], kw["cpu_b"] = t.cpu.terms()
            kw["cpu_pieces"] = ()
        if t.dev.n:
            kw["dev_g0"], kw["dev_g1"] = t.dev.terms()
        if t.copy.n:
            kw["copy_ms"] = t.copy.terms()[0]
        if t.dense.n:
            kw["dense_fixed"], kw["dense_per_tok"] = t.dense.terms()
        head = self._terms[False].head
        if head.n:
            kw["head_ms"] = head.terms()[0]
        return replace(self.prior, **kw) if kw else self.prior
