"""Trace-driven discrete-event simulation of hybrid MoE inference: a CPU, a device and a copy engine, each a
timeline (the time it becomes free), driven per layer by the same policy objects the executor uses. Only the clock
is simulated: decisions come from `moecli.policy`.

Per forward pass and layer: the device runs the dense part (attention, router, shared experts); then the layer's
routed experts are placed (scheduler, or "where they are"), the plan's timeline is evaluated with the cost model,
copies are admitted to the cache, and a prefetch (or a background admission) may use the idle copy engine.
The output head closes each pass. Decode TBT = mean pass time over decode steps; TTFT = the prefill pass time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from moecli.policy.cache import CACHES, BeladyCache, StaticCache
from moecli.policy.cost import CostModel
from moecli.policy.placement import Placement
from moecli.policy.prefetch import ImpactPrefetcher, NoisyPredictor, Target
from moecli.policy.schedule import SCHEDULERS, OptimalScheduler, evaluate
from moecli.sim.traces import Pass


@dataclass
class SimResult:
    pass_ms: list[float] = field(default_factory=list)
    lookups: int = 0
    hits: int = 0
    copies: int = 0
    copied_bytes: int = 0
    prefetch_copies: int = 0
    cpu_tokens: int = 0
    dev_tokens: int = 0
    decisions: int = 0
    decision_s: float = 0.0      # scheduler + cache decisions
    prefetch_s: float = 0.0      # prefetch decisions (prediction excluded)
    records: list = field(default_factory=list)   # scheduler inputs, when asked to record

    @property
    def mean_ms(self) -> float:
        return sum(self.pass_ms) / len(self.pass_ms) if self.pass_ms else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def cpu_share(self) -> float:
        n = self.cpu_tokens + self.dev_tokens
        return self.cpu_tokens / n if n else 0.0

    @property
    def decision_us(self) -> float:
        return self.decision_s / self.decisions * 1e6 if self.decisions else 0.0

    @property
    def prefetch_us(self) -> float:
        return self.prefetch_s / self.decisions * 1e6 if self.decisions else 0.0


def calibration_counts(passes: list[Pass]) -> dict[int, dict[int, int]]:
    """Expert activation counts per layer (for static hot sets and warm starts)."""
    counts: dict[int, dict[int, int]] = {}
    for ps in passes:
        for l, r in ps.layers.items():
            c = counts.setdefault(l, {})
            for e, n in r.tokens().items():
                c[e] = c.get(e, 0) + n
    return counts


def make_cache(kind: str, layers: list[int], n_experts: int, slots: int, initial: dict, passes: list[Pass]):
    cls = CACHES[kind]
    if cls is BeladyCache:
        future = {l: [list(ps.layers[l].tokens()) for ps in passes] for l in layers}
        return cls(len(layers), n_experts, slots, initial, future=future)
    return cls(len(layers), n_experts, slots, initial)


class Simulator:
    def __init__(self, placement: Placement, costs: CostModel, layers: list[int], n_experts: int, slots: int,
                 calib: dict[int, dict[int, int]], predictor_accuracy: float = 0.9, horizon: int = 3,
                 seed: int = 0, record: bool = False):
        self.p, self.costs, self.layers, self.E, self.slots = placement, costs, layers, n_experts, slots
        # Every cache starts from the calibration hot set: as if the model had just been loaded with it.
        self.initial = StaticCache.hot_set(calib, slots)
        self.sched = SCHEDULERS[placement.scheduler]() if placement.scheduler else None
        self.prefetcher = ImpactPrefetcher(costs) if placement.prefetch else None
        self.predictor = NoisyPredictor(n_experts, predictor_accuracy, seed)
        self.horizon, self.record = horizon, record
        self._plan_span = OptimalScheduler()

    def _predict(self, ps: Pass, pi: int, li: int, d: int) -> dict[int, int]:
        l = self.layers[li + d]
        r = ps.layers[l]
        if self.p.perfect_prediction:
            return r.tokens()
        if d in r.pred:  # predictions recorded in the trace (made d layers earlier)
            out: dict[int, int] = {}
            for row in r.pred[d]:
                for e in row:
                    out[e] = out.get(e, 0) + 1
            return out
        return self.predictor.predict(r.ids, d, (pi, l))

    def run(self, passes: list[Pass]) -> SimResult:
        p, c, L = self.p, self.costs, self.layers
        res = SimResult()
        cache = make_cache(p.cache, L, self.E, self.slots, self.initial, passes) if p.cache else None
        inflight: dict[tuple[int, int], float] = {}
        t = cpu_free = dev_free = copy_free = 0.0
        n_cpu_layers = len(L) if (p.n_cpu_moe is not None and p.n_cpu_moe < 0) else p.n_cpu_moe
        if p.mode == "layer-split" and n_cpu_layers is None:
            n_cpu_layers = len(L) - round(self.slots / self.E * len(L))
        nb = c.expert_bytes
        for pi, ps in enumerate(passes):
            start = t
            T = ps.n_tokens
            for li, l in enumerate(L):
                r = ps.layers[l]
                tok = r.tokens()
                t0 = max(t, dev_free) + c.dense(T)  # attention + router + shared experts on the device
                dev_free = t0
                cpu0, copy0 = max(cpu_free, t0), max(copy_free, t0)
                copies: list[int] = []
                ready: dict[int, float] = {}
                if p.mode == "layer-split":
                    res.lookups += len(tok)
                    if li >= n_cpu_layers:  # this layer's experts live on the device
                        res.hits += len(tok)
                        cpu, dev = [], sorted(tok)
                    elif T >= p.offload_min_batch:  # llama.cpp copies the layer's whole expert tensors
                        cpu, dev = [], sorted(tok)
                        copy_free = copy0 + self.E * c.copy_ms
                        for e in dev:
                            ready[e] = copy_free
                        res.copies += self.E
                        res.copied_bytes += self.E * nb
                    else:
                        cpu, dev = sorted(tok), []
                else:
                    d0 = time.perf_counter()
                    cache.update(l, tok, r.mean_scores())
                    cached = cache.cached(l)
                    for e in tok:
                        if e in cached:
                            res.hits += 1
                            ra = inflight.get((l, e))
                            if ra is not None and ra > t0:
                                ready[e] = ra
                    res.lookups += len(tok)
                    if self.sched is not None:
                        if self.record:
                            res.records.append((dict(tok), set(cached) & set(tok), t0, copy0, cpu0, dict(ready)))
                        plan = self.sched.plan(l, tok, cached, c, t0, copy0, cpu0, ready)
                        cpu, dev, copies = plan.cpu, plan.device, plan.copies
                    else:
                        dev = sorted((e for e in tok if e in cached), key=lambda e: ready.get(e, 0.0))
                        cpu = [e for e in tok if e not in cached]
                    for j, e in enumerate(copies):
                        ok, _ = cache.admit(l, e, tok)
                        if ok:
                            inflight[(l, e)] = copy0 + (j + 1) * c.copy_ms
                    res.decision_s += time.perf_counter() - d0
                    res.decisions += 1
                mk, ce, de, cpe = evaluate(tok, cpu, dev, copies, c, cpu0, t0, copy0, ready)
                if copies:
                    copy_free = cpe
                    res.copies += len(copies)
                    res.copied_bytes += len(copies) * nb
                if cpu:
                    cpu_free = ce
                if dev:
                    dev_free = de
                for e in cpu:
                    res.cpu_tokens += tok[e]
                for e in dev:
                    res.dev_tokens += tok[e]
                t = mk
                if cache is None:
                    continue
                if self.prefetcher is not None:
                    self.prefetcher.observe(l, tok)
                    copy_free = self._prefetch(ps, pi, li, t, cache, inflight, res, copy_free)
                d0 = time.perf_counter()
                missed = [e for e in cpu if e not in cache.cached(l)] if p.background_admit else ()
                if missed and copy_free <= t:
                    # The copy engine is idle: bring in the missed expert that had most tokens (highest score).
                    sc = r.mean_scores()
                    e = max(missed, key=lambda e: (tok[e], sc.get(e, 0.0), -e))
                    ok, _ = cache.admit(l, e, tok)
                    if ok:
                        copy_free = t + c.copy_ms
                        inflight[(l, e)] = copy_free
                        res.copies += 1
                        res.copied_bytes += nb
                res.decision_s += time.perf_counter() - d0
            t = max(t, dev_free) + c.head_ms  # output head (and sampling) on the device
            dev_free = t
            res.pass_ms.append(t - start)
        return res

    def _prefetch(self, ps, pi, li, now, cache, inflight, res, copy_free) -> float:
        """Issue prefetch copies for the next layers; returns when the copy engine is free again."""
        c, L = self.costs, self.layers
        targets = []
        start = now
        for d in range(1, self.horizon + 1):
            if li + d >= len(L):
                break
            l = L[li + d]
            pred = self._predict(ps, pi, li, d)
            cached = cache.cached(l)
            ready = {e: r for e in cached if (r := inflight.get((l, e), 0.0)) > now}
            start += c.dense(ps.n_tokens)
            room = self.slots - sum(1 for e in pred if e in cached)
            conf = 1.0 if (self.p.perfect_prediction or d in ps.layers[l].pred) else self.predictor.accuracy ** d
            targets.append(Target(l, pred, set(cached), ready, start, room,
                                  cache.victims(l, pred, max(0, room)), conf))
            start += self._plan_span.plan(l, pred, cached, c, 0.0, 0.0, 0.0,
                                          {e: r - start for e, r in ready.items()}).makespan
        cf = max(copy_free, now)
        d0 = time.perf_counter()
        picks = self.prefetcher.choose(targets, cf)
        res.prefetch_s += time.perf_counter() - d0
        for l, e in picks:
            pred = next(tg.tokens for tg in targets if tg.layer == l)
            ok, _ = cache.admit(l, e, pred)
            if ok:
                cf += c.copy_ms
                inflight[(l, e)] = cf
                res.copies += 1
                res.prefetch_copies += 1
                res.copied_bytes += c.expert_bytes
        return cf


def cache_study(passes: list[Pass], layers: list[int], n_experts: int, slots: int, initial: dict,
                policies=("lru", "lfu", "mrs", "static", "belady")) -> dict[str, float]:
    """Hit rates of cache policies alone under one admission rule: every miss is admitted at once (demand fetch,
    copies take no time), in-use experts protected; static never changes; Belady may bypass."""
    out = {}
    for kind in policies:
        cache = make_cache(kind, layers, n_experts, slots, initial, passes)
        hits = looks = 0
        for ps in passes:
            for l in layers:
                r = ps.layers[l]
                tok = r.tokens()
                cache.update(l, tok, r.mean_scores())
                s = cache.cached(l)
                for e in tok:
                    looks += 1
                    if e in s:
                        hits += 1
                for e in tok:
                    if e not in s:
                        cache.admit(l, e, tok)
        out[kind] = hits / looks if looks else 0.0
    return out
