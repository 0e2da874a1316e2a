"""The per-layer decision core: the one place HybriMoE's decisions are made, for the executor and the simulator.

Per forward pass and MoE layer the driver calls, with times in ms on its own clock (measured by the executor,
simulated by the simulator; nothing else differs):

    d = core.plan_layer(layer, tokens, scores, n_tokens, now, copy_free, cpu_free[, arrivals])
        # (arrivals: the driver's own knowledge of the layer's copies in flight, the executor's from CUDA events)
        # the cache observes the router (update BEFORE planning), then the plan: d.cpu, d.device (order),
        # d.copies (copy-engine order), d.loads [(expert, victim)] admitted to the cache, d.scratch (copies the
        # cache refused: one use), d.ready (arrival of experts still being copied), d.copy_end, d.makespan
    ... the driver runs the plan (executor) or evaluates its timeline (simulator) ...
    a = core.after_layer(layer, tokens, d.cpu, scores, n_tokens, now, copy_free, predictions)
        # prefetch for layers l+1..l+horizon from `predictions` {distance: (tokens, confidence)}, then background
        # admission of the missed expert with most tokens if the copy engine is idle: a.prefetch [(layer, e, victim)],
        # a.admits [(e, victim)], a.copy_free

Routing known one block early (`known`: layers whose router reads the layer input, SmallThinker): before such a
layer's dense part the driver calls

    k = core.known_layer(layer, tokens, n_tokens, now, copy_free)
        # a certain prefetch of the layer's own experts, issued now so the copies overlap its attention:
        # k.prefetch [(layer, e, victim)], k.copy_free

`routing` says what predictions do for known layers: "both" (the default) keeps them (l+1..l+3's prefetch starts
a few layers earlier; the certain prefetch then adds what they missed), "known" ignores them (a known layer's
experts are prefetched with certainty only: its prefetch accuracy is 1). Measured in docs/simulator.md.

Initial contents are explicit (`initial`: layer -> experts; layer-split device layers are full). A static cache with
no initial set calibrates on its first pass (the prompt). Layer-split: the first `cpu_layer_count()` MoE layers keep
their experts on the CPU; with `whole_layer_offload` (llama.cpp's op offload, modelled by the simulator) a batch of
at least `offload_min_batch` tokens copies such a layer's whole expert tensors to the device.

`log` (a list, when given) receives one record per call: the inputs that are clocks and the decisions, so a replay
can be compared decision by decision.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moecli.policy.cache import CACHES, BeladyCache
from moecli.policy.cost import CostModel
from moecli.policy.placement import Placement
from moecli.policy.prefetch import ImpactPrefetcher, Target
from moecli.policy.schedule import SCHEDULERS, OptimalScheduler, evaluate


def cpu_layer_count(p: Placement, n_layers: int, slots: int, n_experts: int) -> int:
    """Layer-split: how many leading MoE layers keep their experts on the CPU. Plain `n-cpu-moe` gives the device as
    many whole layers as `slots` per layer would hold in bytes (rounded down: never more than the slots)."""
    if p.n_cpu_moe is not None:
        return n_layers if p.n_cpu_moe < 0 else min(p.n_cpu_moe, n_layers)
    return n_layers - slots * n_layers // max(n_experts, 1)


def count_rows(rows) -> dict[int, int]:
    """Tokens per expert from per-token id rows (a prediction or a routing), in first-seen order."""
    out: dict[int, int] = {}
    for row in rows:
        for e in row:
            out[e] = out.get(e, 0) + 1
    return out


def mean_scores(scores) -> dict[int, float]:
    """Router probabilities [T, E] averaged over tokens, in float64 (the executor and a replayed trace compute the
    same numbers from the same float32 values)."""
    m = np.asarray(scores, dtype=np.float32).mean(0, dtype=np.float64)
    return dict(enumerate(m.tolist()))


@dataclass
class LayerDecision:
    layer: int
    tokens: dict[int, int]
    cpu: list[int] = field(default_factory=list)
    device: list[int] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)
    loads: list[tuple[int, int | None]] = field(default_factory=list)
    scratch: list[int] = field(default_factory=list)
    ready: dict[int, float] = field(default_factory=dict)
    cached: set[int] = field(default_factory=set)  # active experts resident when the layer started
    offload_copies: int = 0       # layer-split op offload: whole expert tensors copied for this batch
    copy_end: float = 0.0         # when the copy engine is free again after this plan's copies
    makespan: float = 0.0         # predicted end of the layer's experts (absolute, the driver's clock)
    decision_s: float = 0.0


@dataclass
class AfterLayer:
    prefetch: list[tuple[int, int, int | None]] = field(default_factory=list)
    admits: list[tuple[int, int | None]] = field(default_factory=list)
    copy_free: float = 0.0
    need_by: dict[int, float] = field(default_factory=dict)  # target layer -> its estimated start (prefetch)
    prefetch_s: float = 0.0
    decision_s: float = 0.0


class DecisionCore:
    def __init__(self, placement: Placement, costs: CostModel, layers: list[int], n_experts: int, slots: int,
                 initial: dict[int, list[int]] | None = None, future: dict | None = None, horizon: int = 3,
                 whole_layer_offload: bool = False, log: list | None = None, known=(), routing: str = "both"):
        self.p, self.costs, self.layers, self.E = placement, costs, list(layers), n_experts
        self.known = frozenset()  # layers whose routing is known before their dense part (with a prefetcher)
        if routing not in ("both", "known"):
            raise ValueError(f"routing {routing!r}: both or known")
        self.known_only = routing == "known"  # predictions never target known layers
        self.slots = min(slots, n_experts)
        self.horizon, self.whole_layer_offload, self.log = horizon, whole_layer_offload, log
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.split = placement.mode == "layer-split"
        self.inflight: dict[tuple[int, int], float] = {}  # (layer, expert) -> predicted arrival
        if self.split:
            n_cpu = cpu_layer_count(placement, len(self.layers), self.slots, n_experts)
            self.device_layers = set(self.layers[n_cpu:])
            self.cache = None
            self.sched = self.prefetcher = None
            self._calibrated: set[int] = set()
            return
        self.device_layers = set()
        init = {l: list(v)[: self.slots] for l, v in (initial or {}).items()}
        cls = CACHES[placement.cache or "lru"]
        kw = {"future": future} if cls is BeladyCache else {}
        self.cache = cls(len(self.layers), n_experts, self.slots, init, **kw)
        self._calibrated = {l for l, v in init.items() if v}
        self.sched = SCHEDULERS[placement.scheduler]() if placement.scheduler and self.slots else None
        self.prefetcher = ImpactPrefetcher(costs) if placement.prefetch and self.slots else None
        if self.prefetcher is not None:
            self.known = frozenset(known) & set(self.layers)
        self._plan_span = OptimalScheduler()

    # -- state the drivers read ---------------------------------------------------------------------------------
    def resident(self, layer: int) -> set[int]:
        """Experts the device holds (or is receiving) for `layer`."""
        if self.split:
            return set(range(self.E)) if layer in self.device_layers else set()
        return self.cache.cached(layer)

    def initial_loads(self) -> list[tuple[int, int]]:
        """(layer, expert) the device holds before the first pass."""
        if self.split:
            return [(l, e) for l in self.layers if l in self.device_layers for e in range(self.E)]
        return [(l, e) for l in self.layers for e in sorted(self.cache.cached(l))]

    def set_costs(self, costs: CostModel) -> None:
        """A refitted cost model (the executor's own measurements) for every decision from now on."""
        self.costs = costs
        if self.prefetcher is not None:
            self.prefetcher.set_costs(costs)

    # -- the two calls per layer --------------------------------------------------------------------------------
    def plan_layer(self, layer: int, tokens: dict[int, int], scores: dict[int, float] | None, n_tokens: int,
                   now: float, copy_free: float, cpu_free: float,
                   arrivals: dict[int, float] | None = None) -> LayerDecision:
        """`arrivals` (expert -> ms), when the driver knows them (the executor, from its copy engine's events):
        which of the layer's copies are still on their way and when each ends; every other copy has arrived. Without
        them the core's own predictions (issue time + copy cost) stand in."""
        d0 = time.perf_counter()
        c = self.costs
        tok = dict(sorted(tokens.items()))  # id order: decisions never depend on how the driver counted
        d = LayerDecision(layer, tok, copy_end=copy_free)
        copy0, cpu0 = max(copy_free, now), max(cpu_free, now)
        if self.split:
            self._plan_split(d, n_tokens, copy0)
        elif not self.slots:
            d.cpu = list(tok)
        else:
            if self.p.cache == "static" and layer not in self._calibrated:
                self._calibrate(layer, tok, d)
            cache = self.cache
            cache.update(layer, tok, scores)
            cached = cache.cached(layer)
            if arrivals is not None:
                self._observe(layer, cached, arrivals)
            for e in tok:
                if e in cached:
                    d.cached.add(e)
                    ra = self.inflight.get((layer, e))
                    if ra is not None and ra > now:
                        d.ready[e] = ra
            if self.sched is not None:
                plan = self.sched.plan(layer, tok, cached, c, now, copy0, cpu0, d.ready)
                d.cpu, d.device, d.copies = plan.cpu, plan.device, plan.copies
            else:  # experts run where they are
                d.device = sorted((e for e in tok if e in cached), key=lambda e: d.ready.get(e, 0.0))
                d.cpu = [e for e in tok if e not in cached]
            for j, e in enumerate(d.copies):
                ok, victim = cache.admit(layer, e, tok)
                if ok:
                    self._arrive(layer, e, victim, copy0 + (j + 1) * c.copy_ms)
                    d.loads.append((e, victim))
                else:
                    d.scratch.append(e)
            if d.copies:
                d.copy_end = copy0 + len(d.copies) * c.copy_ms
        d.makespan = evaluate(tok, d.cpu, d.device, d.copies, c, cpu0, now, copy0, d.ready)[0]
        d.decision_s = time.perf_counter() - d0
        if self.log is not None:
            self.log.append(("plan", layer, now, copy_free, cpu_free, d.cpu, d.device, d.copies, d.loads,
                             d.scratch, sorted(d.ready.items())))
        return d

    def after_layer(self, layer: int, tokens: dict[int, int], cpu: list[int], scores: dict[int, float] | None,
                    n_tokens: int, now: float, copy_free: float,
                    predictions: dict[int, tuple[dict[int, int], float]] | None = None) -> AfterLayer:
        a = AfterLayer(copy_free=copy_free)
        if self.cache is None or not self.slots:
            return a
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, tokens)
            d0 = time.perf_counter()
            a.copy_free = self._prefetch(layer, n_tokens, now, copy_free, predictions or {}, a)
            a.prefetch_s = time.perf_counter() - d0
        d0 = time.perf_counter()
        cache = self.cache
        missed = [e for e in cpu if e not in cache.cached(layer)] if self.p.background_admit else ()
        if missed and a.copy_free <= now:
            # The copy engine is idle: bring in the missed expert with most tokens (then highest score).
            sc = scores or {}
            e = max(missed, key=lambda e: (tokens[e], sc.get(e, 0.0), -e))
            ok, victim = cache.admit(layer, e, tokens)
            if ok:
                a.copy_free = now + self.costs.copy_ms
                self._arrive(layer, e, victim, a.copy_free)
                a.admits.append((e, victim))
        a.decision_s = time.perf_counter() - d0
        if self.log is not None:
            self.log.append(("after", layer, now, copy_free, a.prefetch, a.admits))
        return a

    def known_layer(self, layer: int, tokens: dict[int, int], n_tokens: int, now: float,
                    copy_free: float) -> AfterLayer:
        """The layer's routing, known before its dense part: the prefetcher picks its copies by impact with
        confidence 1, for a layer starting after that dense part."""
        a = AfterLayer(copy_free=copy_free)
        if layer in self.known:
            d0 = time.perf_counter()
            tok = dict(sorted(tokens.items()))
            a.copy_free = self._issue([self._target(layer, tok, 1.0, now, now + self.costs.dense(n_tokens))],
                                      now, copy_free, a)
            a.prefetch_s = time.perf_counter() - d0
        if self.log is not None:
            self.log.append(("known", layer, now, copy_free, a.prefetch))
        return a

    # -- mechanics ----------------------------------------------------------------------------------------------
    def _plan_split(self, d: LayerDecision, n_tokens: int, copy0: float) -> None:
        tok = d.tokens
        if d.layer in self.device_layers:
            d.cached, d.device = set(tok), list(tok)
        elif self.whole_layer_offload and n_tokens >= self.p.offload_min_batch:
            d.device = list(tok)  # llama.cpp copies the layer's whole expert tensors, then runs them there
            d.copy_end = copy0 + self.E * self.costs.copy_ms
            d.ready = {e: d.copy_end for e in tok}
            d.offload_copies = self.E
        else:
            d.cpu = list(tok)

    def _calibrate(self, layer: int, tok: dict[int, int], d: LayerDecision) -> None:
        """kTransformers-style static hot set: the layer's most routed experts in its first pass."""
        self._calibrated.add(layer)
        hot = sorted(range(self.E), key=lambda e: (-tok.get(e, 0), e))[: self.slots]
        self.cache.cached(layer).update(hot)
        d.loads += [(e, None) for e in hot]

    def cancel_admission(self, layer: int, e: int, victim: int | None) -> None:
        """The copy engine refused a prefetch admitted by `after_layer` (back-pressure): the cache forgets `e` and
        keeps `victim`, as before the admission."""
        s = self.cache.cached(layer)
        s.discard(e)
        if victim is not None:
            s.add(victim)
        self.inflight.pop((layer, e), None)

    def _observe(self, layer: int, cached: set[int], arrivals: dict[int, float]) -> None:
        for e in cached:
            if e in arrivals:
                self.inflight[(layer, e)] = arrivals[e]
            else:
                self.inflight.pop((layer, e), None)

    def _arrive(self, layer: int, e: int, victim: int | None, at: float) -> None:
        if victim is not None:
            self.inflight.pop((layer, victim), None)
        self.inflight[(layer, e)] = at

    def _prefetch(self, layer, n_tokens, now, copy_free, predictions, a: AfterLayer) -> float:
        """Targets l+1..l+horizon with their predicted plans (known layers excepted when `known_only`: their
        routing comes with certainty before they start); the prefetcher picks copies by impact."""
        c, L = self.costs, self.layers
        li = self._index[layer]
        targets, start = [], now
        for dist in range(1, self.horizon + 1):
            if li + dist >= len(L) or dist not in predictions:
                break
            l = L[li + dist]
            pred, conf = predictions[dist]
            start += c.dense(n_tokens)
            t = self._target(l, pred, conf, now, start)
            if not (self.known_only and l in self.known):
                targets.append(t)
            start += self._plan_span.plan(l, pred, t.cached, c, 0.0, 0.0, 0.0,
                                          {e: r - start for e, r in t.ready_at.items()}).makespan
        return self._issue(targets, now, copy_free, a)

    def _target(self, l: int, tokens: dict[int, int], conf: float, now: float, start: float) -> Target:
        cached = self.cache.cached(l)
        ready = {e: r for e in cached if (r := self.inflight.get((l, e), 0.0)) > now}
        room = self.slots - sum(1 for e in tokens if e in cached)
        return Target(l, tokens, set(cached), ready, start, room, self.cache.victims(l, tokens, max(0, room)), conf)

    def _issue(self, targets: list[Target], now: float, copy_free: float, a: AfterLayer) -> float:
        """The prefetcher's picks for `targets` admitted and queued on the copy engine: its new free time."""
        cf = max(copy_free, now)
        if not targets:
            return cf
        a.need_by.update((t.layer, t.start_at) for t in targets)  # the copy engine's deadlines (back-pressure)
        for l, e in self.prefetcher.choose(targets, cf):
            pred = next(tg.tokens for tg in targets if tg.layer == l)
            ok, victim = self.cache.admit(l, e, pred)
            if ok:
                cf += self.costs.copy_ms
                self._arrive(l, e, victim, cf)
                a.prefetch.append((l, e, victim))
        return cf
