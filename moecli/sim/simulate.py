"""Trace-driven discrete-event simulation of hybrid MoE inference: a CPU, a device and a copy engine, each a
timeline (the time it becomes free), driven per layer by the decision core the executor uses
(`moecli.policy.core.DecisionCore`). Only the clock is simulated.

Per forward pass and layer: the device runs the dense part (attention, router, shared experts); then the layer's
routed experts are placed (scheduler, or "where they are"), the plan's timeline is evaluated with the cost model,
copies are admitted to the cache, and a prefetch (or a background admission) may use the idle copy engine.
The output head closes each pass. Decode TBT = mean pass time over decode steps; TTFT = the prefill pass time.
Layers whose routing is known one block early (`known`, SmallThinker's router on the layer input) get the decision
core's certain prefetch before their dense part, so those copies overlap it (`routing`: "both" keeps predicting
them from earlier layers too, "known" does not). Prefetch accuracy: of the experts prefetched for a layer, the
share that layer then used, per source ("known": the certain prefetch, "pred": from predictions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moecli.policy.cache import CACHES, BeladyCache, StaticCache
from moecli.policy.core import DecisionCore, count_rows
from moecli.policy.cost import CostModel
from moecli.policy.placement import Placement
from moecli.policy.prefetch import NoisyPredictor
from moecli.policy.schedule import evaluate
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
    prefetch_judged: dict = field(default_factory=dict)  # (target layer, source) -> [used, prefetched]

    def prefetch_accuracy(self, layers=None, source: str | None = None) -> float | None:
        """Share of prefetched experts their target layer then used (over `layers` and `source`, "known" or
        "pred", default all); None: nothing prefetched."""
        got = [v for (l, src), v in self.prefetch_judged.items()
               if (layers is None or l in layers) and source in (None, src)]
        n = sum(v[1] for v in got)
        return sum(v[0] for v in got) / n if n else None

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
    """Drives `DecisionCore` with a simulated clock. `initial`: the cache contents at load (default: the calibration
    hot set, as if the model had just been loaded with it). `recorded_clock`: take each layer's clock readings and
    each pass's cost model from the trace (one the executor recorded) instead of simulating them: a replay, whose
    decisions are the executor's. `whole_layer_offload`: model llama.cpp copying a CPU layer's experts for a batch
    of >= 32 tokens in layer-split placements (default: yes, except in replays: the executor does not).
    `sync_copies`: the executor on a device without a copy engine (torch's CPU device): copies hold the device's
    thread (demand copies before its experts, prefetch and admissions after them), the CPU experts overlap them."""

    def __init__(self, placement: Placement, costs: CostModel, layers: list[int], n_experts: int, slots: int,
                 calib: dict[int, dict[int, int]], predictor_accuracy: float = 0.9, horizon: int = 3,
                 seed: int = 0, record: bool = False, initial: dict[int, list[int]] | None = None,
                 recorded_clock: bool = False, log: list | None = None, whole_layer_offload: bool | None = None,
                 sync_copies: bool = False, known=(), routing: str = "both"):
        self.p, self.costs, self.layers, self.E, self.slots = placement, costs, layers, n_experts, slots
        self.initial = StaticCache.hot_set(calib, slots) if initial is None else initial
        self.predictor = NoisyPredictor(n_experts, predictor_accuracy, seed)
        self.horizon, self.record, self.recorded_clock, self.log = horizon, record, recorded_clock, log
        # llama.cpp's op offload of large batches in layer-split mode; moecli's executor runs them on the CPU
        self.offload = not recorded_clock if whole_layer_offload is None else whole_layer_offload
        self.sync_copies = sync_copies
        self.known = frozenset(known)  # layers whose routing is known before their dense part (trace.known_early)
        self.routing = routing

    def _predict(self, ps: Pass, pi: int, li: int, d: int) -> tuple[dict[int, int], float]:
        l = self.layers[li + d]
        r = ps.layers[l]
        if self.p.perfect_prediction:
            return r.tokens(), 1.0
        if d in r.pred:  # predictions recorded in the trace (made d layers earlier)
            return count_rows(r.pred[d]), 1.0
        return self.predictor.predict(r.ids, d, (pi, l)), self.predictor.accuracy ** d

    def run(self, passes: list[Pass]) -> SimResult:
        p, L = self.p, self.layers
        res = SimResult()
        future = ({l: [list(ps.layers[l].tokens()) for ps in passes] for l in L} if p.cache == "belady" else None)
        core = DecisionCore(p, self.costs, L, self.E, self.slots, self.initial, future, self.horizon,
                            whole_layer_offload=self.offload, log=self.log, known=self.known,
                            routing=self.routing)
        t = cpu_free = dev_free = copy_free = 0.0
        nb = self.costs.expert_bytes
        for pi, ps in enumerate(passes):
            if self.recorded_clock and ps.costs:
                core.set_costs(CostModel.from_dict(ps.costs))
            c = core.costs
            start = t
            T = ps.n_tokens
            pending: dict[int, list] = {}  # target layer -> (expert, source) prefetched for it in this pass
            for li, l in enumerate(L):
                r = ps.layers[l]
                tok = r.tokens()
                clock = r.clock if self.recorded_clock else None
                t0 = max(t, dev_free)
                if l in core.known:  # routing from the layer input: certain copies, overlapping attention
                    if clock and "known_now" in clock:
                        t0, copy_free = clock["known_now"], clock["known_copy"]
                    k = core.known_layer(l, tok, T, t0, copy_free)
                    copy_free = k.copy_free
                    self._count_prefetch(res, k.prefetch, pending, "known")
                    res.prefetch_s += k.prefetch_s
                    if self.sync_copies and not clock:
                        t0 += len(k.prefetch) * c.copy_ms  # they hold the device's thread, before attention
                        copy_free = t0
                t0 += c.dense(T)  # attention + router + shared experts on the device
                if clock:
                    t0, copy_free, cpu_free = clock["now"], clock["copy"], clock["cpu"]
                dev_free = t0
                if self.sync_copies and not clock:
                    copy_free = t0  # synchronous copies: the engine is never behind
                arrivals = ({int(e): at for e, at in clock["arrivals"].items()}
                            if clock and "arrivals" in clock else None)  # the executor's, from its copy engine
                d = core.plan_layer(l, tok, r.mean_scores(), T, t0, copy_free, cpu_free, arrivals)
                copy0, cpu0 = max(copy_free, t0), max(cpu_free, t0)
                res.lookups += len(tok)
                res.hits += len(d.cached)
                for e, src in pending.pop(l, ()):
                    judged = res.prefetch_judged.setdefault((l, src), [0, 0])
                    judged[0] += e in tok
                    judged[1] += 1
                if self.record and core.sched is not None:
                    res.records.append((dict(d.tokens), set(d.cached), t0, copy0, cpu0, dict(d.ready)))
                if not core.split:
                    res.decision_s += d.decision_s
                    res.decisions += 1
                if self.sync_copies:  # the copies first on the device's thread, then its experts
                    dev0 = t0 + len(d.copies) * c.copy_ms
                    mk, ce, de, _ = evaluate(d.tokens, d.cpu, d.device, [], c, cpu0, dev0, copy0, d.ready)
                    de = max(de, dev0)
                else:
                    mk, ce, de, _ = evaluate(d.tokens, d.cpu, d.device, d.copies, c, cpu0, t0, copy0, d.ready)
                copy_free = d.copy_end
                n_copies = len(d.copies) + d.offload_copies
                res.copies += n_copies
                res.copied_bytes += n_copies * nb
                if d.cpu:
                    cpu_free = ce
                if d.device:
                    dev_free = de
                for e in d.cpu:
                    res.cpu_tokens += tok[e]
                for e in d.device:
                    res.dev_tokens += tok[e]
                t = de if self.sync_copies else mk  # sync: decided on the device's thread, before the CPU joins
                if self.sync_copies:
                    copy_free = t
                if clock:
                    t, copy_free = clock["after_now"], clock["after_copy"]
                preds = ({dd: self._predict(ps, pi, li, dd) for dd in range(1, self.horizon + 1) if li + dd < len(L)}
                         if core.prefetcher is not None else None)
                a = core.after_layer(l, d.tokens, d.cpu, r.mean_scores(), T, t, copy_free, preds)
                copy_free = a.copy_free
                n_after = len(a.prefetch) + len(a.admits)
                if self.sync_copies and not clock:
                    t = max(mk, t + n_after * c.copy_ms)  # those copies hold the thread, then the CPU joins
                    copy_free = dev_free = t
                res.copies += len(a.admits)
                res.copied_bytes += len(a.admits) * nb
                self._count_prefetch(res, a.prefetch, pending, "pred")
                res.prefetch_s += a.prefetch_s
                res.decision_s += a.decision_s
            t = max(t, dev_free) + c.head_ms  # output head (and sampling) on the device
            dev_free = t
            res.pass_ms.append(t - start)
        return res

    def _count_prefetch(self, res: SimResult, prefetch, pending: dict, source: str) -> None:
        res.copies += len(prefetch)
        res.prefetch_copies += len(prefetch)
        res.copied_bytes += len(prefetch) * self.costs.expert_bytes
        for l, e, _ in prefetch:
            pending.setdefault(l, []).append((e, source))


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
