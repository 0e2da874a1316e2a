"""Impact-driven prefetch (HybriMoE): while layer l runs, copy the experts whose presence most shortens the plans
of layers l+1..l+3, as predicted from the current hidden state through their gates.

impact(L, e) = span(L's predicted plan with the current cache) − span(the same with e loaded by the time its copy
would end). Candidates are taken greedily by impact, re-evaluating the target layer after each pick, while the copy
engine would still start the copy before that layer starts.

Deviation from the paper, measured in docs/simulator.md: a pick is worth its impact times the prediction's
confidence minus what the eviction it forces is expected to cost (the victim's recent activation frequency times
the per-token CPU-vs-device saving). Without that term, on copy-bound hosts (PCIe 3.0, large experts) prefetch
evicts hot experts for single uses and loses to a plain LRU cache. The executor supplies predictions from the gates;
a trace may carry them; otherwise `NoisyPredictor` models a predictor of given accuracy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from moecli.policy.cost import CostModel
from moecli.policy.schedule import OptimalScheduler


@dataclass
class Target:
    layer: int
    tokens: dict[int, int]        # predicted experts -> predicted token counts
    cached: set[int]              # resident or arriving experts of that layer
    ready_at: dict[int, float]    # arrival time of experts still being copied (absolute)
    start_at: float               # estimated start of that layer's MoE (absolute)
    room: int                     # slots usable without evicting its predicted experts
    victims: list = None          # the cache's eviction order for those slots (None: a free slot)
    confidence: float = 1.0       # probability the prediction is right (the predictor's measured accuracy)


class ImpactPrefetcher:
    def __init__(self, costs: CostModel, scheduler=None, max_per_call: int = 8, eviction_aware: bool = True,
                 beta: float = 0.1, max_candidates: int = 6):
        self.costs = costs
        self.sched = scheduler or OptimalScheduler()
        self.max_per_call = max_per_call
        self.max_candidates = max_candidates  # per target: the uncached experts with most predicted tokens
        self.eviction_aware = eviction_aware
        self.beta = beta
        self._freq: dict[int, dict[int, float]] = {}
        self.set_costs(costs)

    def set_costs(self, costs: CostModel) -> None:
        self.costs = costs
        self._saving = max(0.0, costs.cpu(1) - costs.dev(1))

    def observe(self, layer: int, tokens: dict[int, int]) -> None:
        """Track each expert's recent activation frequency (EMA over steps) to price evictions."""
        f = self._freq.setdefault(layer, {})
        keep = 1.0 - self.beta
        for e in list(f):
            f[e] *= keep
        for e in tokens:
            f[e] = f.get(e, 0.0) + self.beta

    def eviction_cost(self, layer: int, victim: int | None) -> float:
        if victim is None or not self.eviction_aware:
            return 0.0
        return self._freq.get(layer, {}).get(victim, 0.0) * self._saving

    def _span(self, t: Target, cached, ready) -> float:
        # The layer's plan from its start: everything free then, except experts still arriving.
        rel = {e: r - t.start_at for e, r in ready.items()}
        if isinstance(self.sched, OptimalScheduler):
            return self.sched.plan(t.layer, t.tokens, cached, self.costs, 0.0, 0.0, 0.0, rel, span_only=True)
        return self.sched.plan(t.layer, t.tokens, cached, self.costs, 0.0, 0.0, 0.0, rel).makespan

    def choose(self, targets: list[Target], copy_free_at: float) -> list[tuple[int, int]]:
        """Ordered (layer, expert) copies to issue now on a copy engine free at `copy_free_at`."""
        picks: list[tuple[int, int]] = []
        state = []
        for t in targets:
            if t.room <= 0 or not t.tokens:
                continue
            cached = set(t.cached)
            ready = dict(t.ready_at)
            victims = list(t.victims or [None] * t.room)
            cands = sorted((e for e in t.tokens if e not in cached), key=lambda e: (-t.tokens[e], e))
            state.append([t, cached, ready, self._span(t, cached, ready), t.room, victims,
                          cands[: self.max_candidates]])
        c = self.costs.copy_ms
        while state and len(picks) < self.max_per_call:
            best = None
            end = copy_free_at + c
            for st in state:
                t, cached, ready, base, room, victims, cands = st
                if room <= 0 or copy_free_at >= t.start_at:
                    continue
                loss = self.eviction_cost(t.layer, victims[0] if victims else None)
                # Candidates with the same predicted token count are interchangeable in the target's plan (same
                # makespan up to relabelling): one plan per distinct count, the first such candidate in order.
                seen: set[int] = set()
                for e in cands:
                    if e in cached or t.tokens[e] in seen:
                        continue
                    seen.add(t.tokens[e])
                    ready[e] = end
                    cached.add(e)
                    impact = base - self._span(t, cached, ready)
                    cached.discard(e)
                    del ready[e]
                    net = impact * t.confidence - loss
                    if impact > 1e-9 and net > 1e-9 and (best is None or net > best[0]):
                        best = (net, st, e, impact)
            if best is None:
                break
            _, st, e, impact = best
            st[1].add(e)
            st[2][e] = end
            st[3] -= impact
            st[4] -= 1
            if st[5]:
                st[5].pop(0)
            picks.append((st[0].layer, e))
            copy_free_at = end
        return picks


class NoisyPredictor:
    """Stand-in for gate-ahead prediction when a trace carries none: each truly selected expert of the layer
    d ahead is predicted with probability accuracy**d, otherwise replaced by a uniformly drawn wrong expert.
    Token counts are those of the predicted per-token sets. Deterministic for a given seed."""

    def __init__(self, n_experts: int, accuracy: float = 0.9, seed: int = 0):
        self.n_experts, self.accuracy, self.seed = n_experts, accuracy, seed

    def predict(self, ids_per_token: list, distance: int, key: tuple) -> dict[int, int]:
        p = self.accuracy ** distance
        rng = random.Random(hash((self.seed, distance) + key))
        out: dict[int, int] = {}
        E = self.n_experts
        for row in ids_per_token:
            for e in row:
                if rng.random() >= p:
                    while True:
                        w = rng.randrange(E)
                        if w not in row:
                            break
                    e = w
                out[e] = out.get(e, 0) + 1
        return out
