"""The hybrid executor: HybriMoE's decisions on real tensors.

Per MoE layer and step, `HybridExperts(layer, hidden, ids, weights, scores)`:
  1. tokens per expert -> the decision core: the cache observes the router, then the plan (CPU / device-cached /
     device-after-copy, or "run where they are") and the copies it admits;
  2. the CPU pairs go to the ggml worker thread (one graph, GIL released) while the device computes cached experts
     and then copied ones, each waiting only for its own copy (with nothing for the device to do, the ggml call runs
     on this thread); copies go through the copy engine by priority: demand, then prefetch, then background;
  3. prefetch: layers l+1..l+3's gates applied to this hidden state predict their experts; the highest-impact
     ones are copied while the copy engine would otherwise idle; a missed expert is admitted when it is idle.
A router on the layer input (SmallThinker) routes before attention: `known(layer, ids)` then gives the decision
core that routing as certain, and its copies overlap attention (one more device->host read, the ids).
Every decision is the decision core's (moecli/policy/core.py), the simulator's too; only the clock differs: here it
is measured, and the cost model is refitted from this executor's own timings at each forward pass.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from moecli.errors import MoecliError
from moecli.models.config import Checkpoint
from moecli.policy.core import DecisionCore, count_rows, mean_scores
from moecli.policy.cost import CostModel
from moecli.policy.placement import Placement, get_placement
from moecli.policy.refit import CostRefit
from moecli.runtime.copy_engine import BACKGROUND, DEMAND, PREFETCH
from moecli.runtime.cpu_backend import GgmlExperts
from moecli.runtime.device_cache import DeviceExpertCache
from moecli.runtime.host_link import HostLink

PREFETCH_DISTANCE = 3  # layers ahead whose experts are predicted from the current hidden state


@dataclass
class Stats:
    """Counters per run (cumulative), and per layer: measured wall ms, the cost model's prediction of the same
    span, and the decision core's own time."""

    active: int = 0  # (layer, expert) activations
    hits: int = 0  # of those, resident on the device when the layer started
    cpu_experts: int = 0
    device_experts: int = 0
    copied_experts: int = 0  # copies issued (demand, background and prefetch)
    prefetched: int = 0
    prefetch_refused: int = 0  # prefetch copies the copy engine refused (could not arrive in time)
    bytes_copied: int = 0
    syncs: int = 0  # host<->device synchronisations (device tensors read on the host, results joined)
    launches: int = 0  # device expert computations issued (one per device expert today; grouped kernels: fewer)
    layer_ms: dict[int, float] = field(default_factory=dict)  # measured wall ms per layer (experts call)
    predicted_ms: dict[int, float] = field(default_factory=dict)  # the cost model's span for the same calls
    decision_ms: dict[int, float] = field(default_factory=dict)  # decision core: plan + admissions
    prefetch_ms: dict[int, float] = field(default_factory=dict)  # prediction (gates) + prefetch choice, no copies
    calls: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.active if self.active else 0.0

    @property
    def cpu_share(self) -> float:
        n = self.cpu_experts + self.device_experts
        return self.cpu_experts / n if n else 1.0

    def cost_model_error(self) -> float | None:
        """(predicted - measured) / measured over every layer call so far; None before any."""
        m = sum(self.layer_ms.values())
        return (sum(self.predicted_ms.values()) - m) / m if m > 0 else None

    def per_layer(self) -> dict[int, dict[str, float]]:
        n = max(self.calls, 1)
        return {l: {"measured_ms": ms, "predicted_ms": self.predicted_ms.get(l, 0.0),
                    "decision_ms": self.decision_ms.get(l, 0.0), "prefetch_ms": self.prefetch_ms.get(l, 0.0)}
                for l, ms in sorted(self.layer_ms.items())} if n else {}

    def as_dict(self) -> dict:
        return {"hit_rate": self.hit_rate, "active": self.active, "hits": self.hits, "cpu_experts": self.cpu_experts,
                "device_experts": self.device_experts, "copied_experts": self.copied_experts,
                "prefetched": self.prefetched, "prefetch_refused": self.prefetch_refused,
                "bytes_copied": self.bytes_copied, "cpu_share": self.cpu_share,
                "syncs": self.syncs, "launches": self.launches, "calls": self.calls,
                "cost_model_error": self.cost_model_error(),
                "decision_ms": sum(self.decision_ms.values()), "prefetch_ms": sum(self.prefetch_ms.values())}


def default_costs(ckpt: Checkpoint, cpu_gbs: float = 20.0, pcie_gbs: float = 12.0, dev_gbs: float = 500.0) -> CostModel:
    """Safe defaults when no host profile exists: decode is memory-bound, so bytes / bandwidth per expert."""
    l0 = next(int(k.split(".")[1]) for k in ckpt.experts)
    nbytes = sum(ckpt.experts[f"blk.{l0}.ffn_{p}_exps"].expert(0).nbytes for p in ("gate", "up", "down"))
    c = ckpt.config
    flops = 6.0 * c.n_embd * c.n_ff_exp
    return CostModel(cpu_a=flops / 100e9 * 1e3, cpu_b=nbytes / (cpu_gbs * 1e9) * 1e3, cpu_first=0.02,
                     dev_g0=nbytes / (dev_gbs * 1e9) * 1e3 + 0.01, dev_g1=flops / 20e12 * 1e3,
                     copy_ms=nbytes / (pcie_gbs * 1e9) * 1e3, expert_bytes=nbytes)


class HybridExperts:
    def __init__(self, ckpt: Checkpoint, device, placement: str | Placement = "hybrimoe", expert_slots: int = 0,
                 costs: CostModel | None = None, cpu: GgmlExperts | None = None, dtype=torch.float32,
                 refit: bool = True):
        c = ckpt.config
        self.p = get_placement(placement) if isinstance(placement, str) else placement
        self.device = torch.device(device)
        self.n_expert, self.top_k = c.n_expert, c.n_expert_used
        self.costs = costs or default_costs(ckpt)
        self.cpu = cpu or GgmlExperts(ckpt)
        self.layers = [l for l in range(c.n_layer) if f"blk.{l}.ffn_gate_exps" in ckpt.experts]
        if self.p.cache == "belady" or self.p.perfect_prediction:
            raise MoecliError(f"placement {self.p.name!r} needs the future (an offline bound): use it with "
                              "`moecli bench --simulate`")
        self.slots = min(expert_slots, self.n_expert)
        # layers whose routing is known one attention block early (the router reads the layer input)
        self.known_layers = list(self.layers) if c.router_input == "layer" else []
        self.log: list | None = None  # the decision core's records, when a caller sets a list (replay tests)
        self.core = DecisionCore(self.p, self.costs, self.layers, self.n_expert, self.slots,
                                 horizon=PREFETCH_DISTANCE, known=self.known_layers)
        if self.core.split:  # llama.cpp's layer split: whole device layers, no slots for the CPU layers
            self.dev = DeviceExpertCache(ckpt, self.device, self.n_expert, dtype,
                                         layers=sorted(self.core.device_layers), copy_ms=self.costs.copy_ms)
        else:
            self.dev = DeviceExpertCache(ckpt, self.device, self.slots, dtype, copy_ms=self.costs.copy_ms)
        self.refit = CostRefit(self.costs) if refit else None
        self.stats = Stats()
        self._pred_gates: dict = {}  # set by attach(): layer -> the next layers' stacked gates, for prediction
        self.link = HostLink(self.device)  # the one device->host read and the one host->device write per layer
        self.n_embd = c.n_embd
        self.recorder = None  # callable(layer, ids, weights, scores, predictions, clock, costs) for --record-trace
        self._epoch = time.perf_counter()
        self.dev.copy_engine.clock = self._now  # the engine's estimates on this executor's clock
        self._left = None  # ms when the previous experts call returned (dense time of the next layer)
        self._cpu_times: list[tuple] = []  # (experts, tokens, ms, in a prompt) of CPU runs not yet fitted
        self._pred: dict[int, dict[int, list[list[int]]]] = {}  # target layer -> distance -> predicted ids
        self._known_clock: dict[int, dict[str, float]] = {}  # layer -> clock at its known-routing prefetch
        self._held_ms = 0.0  # synchronous known-routing copies since the last experts call (not dense time)
        for l, e in self.core.initial_loads():  # llama.cpp-style whole layers: resident from the start
            self._load(l, e, None, DEMAND)

    def attach(self, transformer) -> None:
        self._pred_gates = stacked_gates(transformer, self.layers)

    def _now(self) -> float:
        return (time.perf_counter() - self._epoch) * 1e3

    def staging(self, n: int) -> "_Staged | None":
        """Where the dense decode kernels put a layer's routing ids (float32), weights, FFN input and scores: the
        head of the packed buffer `_read` sends to the host, in its order (one token; None for prompts)."""
        if n != 1:
            return None
        return _Staged(*self.link.staged(((1, self.top_k), (1, self.top_k), (1, self.n_embd), (1, self.n_expert))))

    # -- the experts seam ---------------------------------------------------------------------------------------
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        now = self._now()
        n, k = ids.shape
        st, core = self.stats, self.core
        while self._cpu_times:
            m, N, ms, prompt = self._cpu_times.pop()
            self.refit.cpu(m, N, ms, prompt)
        if self.refit is not None:  # each copy as the engine measured it (CUDA: its events)
            for nbytes, ms in self.dev.copy_engine.take_times():
                self.refit.copy(1, ms * self.dev.slot_bytes / nbytes if nbytes else ms)
        held, self._held_ms = self._held_ms, 0.0
        if layer == self.layers[0]:
            self._new_pass(n, now - held)
        elif self._left is not None and self.refit is not None:
            self.refit.dense(n, now - held - self._left)
        syncs0 = self.link.syncs
        t_pf = time.perf_counter()
        # predictions serve prefetch (unless every layer's routing is known early and the core takes only that)
        # and a recorded trace (the simulator's comparison)
        predict = self.recorder is not None or (core.prefetcher is not None
                                                and not (core.known_only and core.known >= set(self.layers)))
        pred_ids = self._predict(layer, hidden) if predict else None  # on the device, read with the routing
        predict_s = time.perf_counter() - t_pf
        r = self._read(layer, hidden, ids, weights, scores, pred_ids)  # sync 1: everything the host needs
        ids_np = r.ids.reshape(-1)
        counts = np.bincount(ids_np, minlength=self.n_expert)
        active = np.flatnonzero(counts)
        tokens = dict(zip(active.tolist(), counts[active].tolist()))
        sc = mean_scores(r.scores) if r.scores is not None else self._score_dict(ids_np, r.weights, n)
        copy_free = self._copy_free_at(now)
        arrivals = self.dev.arrivals(layer, now)  # the copies still on their way, from the engine's events
        d = core.plan_layer(layer, tokens, sc, n, now, copy_free, now, arrivals)
        st.active += len(tokens)
        st.hits += len(d.cached)

        fut, t_cpu = None, time.perf_counter()
        if d.cpu:  # CPU first so it overlaps everything below; pairs stay token-major (llama.cpp's order)
            mask = np.isin(ids_np, np.asarray(d.cpu, dtype=np.int64))
            tok = np.repeat(np.arange(n, dtype=np.int32), k)[mask]
            args = (layer, r.hidden, tok, ids_np[mask].astype(np.int32), r.weights.reshape(-1)[mask])
            if d.device or d.loads:  # device work to overlap: the ggml call goes to the worker thread
                fut = self.cpu.engine.submit(*args)
            else:  # nothing to overlap: run here, no hand-off between threads (CPU-only mode's cost)
                fut = Future()
                fut.set_result(self.cpu.engine.run(*args))
            if self.refit is not None:  # timed on the worker as it finishes; fitted on this thread next call
                m, N = len(d.cpu), int(mask.sum())
                fut.add_done_callback(lambda f: self._cpu_times.append((m, N, (time.perf_counter() - t_cpu) * 1e3,
                                                                        n > 1)))
        st.cpu_experts += len(d.cpu)
        st.device_experts += len(d.device)
        for e, victim in d.loads:  # after the CPU's submit: without CUDA these copies hold this thread
            self._load(layer, e, victim, DEMAND)

        t_dev = time.perf_counter()
        out = self._device_experts(layer, hidden, ids, weights, d.device, set(d.scratch))
        st.launches += self.dev.launches(len(d.device), len(d.scratch))
        if self.refit is not None and d.device and not self.dev.copy_engine.cuda:
            scratch_ms = self.core.costs.copy_ms * len(d.scratch)  # one-off copies inside
            self.refit.dev(len(d.device), sum(tokens[e] for e in d.device),
                           (time.perf_counter() - t_dev) * 1e3 - scratch_ms)

        t_pf = time.perf_counter()
        predictions = self._unpack_predictions(layer, r.pred)
        predict_s += time.perf_counter() - t_pf
        after_now = self._now()
        after_copy = self._copy_free_at(after_now)
        a = core.after_layer(layer, d.tokens, d.cpu, sc, n, after_now, after_copy,
                             {dist: (count_rows(rows), 1.0) for (_, dist), rows in predictions.items()})
        for l, e, victim in a.prefetch:  # back-pressure: a copy that cannot arrive before its layer is refused
            if self._load(l, e, victim, PREFETCH, a.need_by.get(l), after_now):
                st.prefetched += 1
            else:
                core.cancel_admission(l, e, victim)
                st.prefetch_refused += 1
        for e, victim in a.admits:
            self._load(layer, e, victim, BACKGROUND)
        st.prefetch_ms[layer] = st.prefetch_ms.get(layer, 0.0) + (predict_s + a.prefetch_s) * 1e3
        st.decision_ms[layer] = st.decision_ms.get(layer, 0.0) + (d.decision_s + a.decision_s) * 1e3
        if self.log is not None:
            self.log.append(core_record(layer, d, a))
        if self.recorder is not None:  # host copies of what was read (the packed buffer is reused next layer)
            clock = {"now": now, "copy": copy_free, "cpu": now, "after_now": after_now, "after_copy": after_copy,
                     "arrivals": {str(e): t for e, t in arrivals.items()}, **self._known_clock.pop(layer, {})}
            self.recorder(layer, torch.from_numpy(r.ids.copy()), torch.from_numpy(r.weights.copy()),
                          None if r.scores is None else torch.from_numpy(r.scores.copy()),
                          self._pred.pop(layer, {}), clock, core.costs.as_dict() if layer == self.layers[0] else None)
            for target, pred in predictions.items():
                self._pred.setdefault(target[0], {})[target[1]] = pred
        if fut is not None:
            out += self.link.write(fut.result())  # sync 2: joined on the device, in stream order
        st.syncs += self.link.syncs - syncs0
        end = self._now()
        st.layer_ms[layer] = st.layer_ms.get(layer, 0.0) + end - now
        st.predicted_ms[layer] = st.predicted_ms.get(layer, 0.0) + d.makespan - now
        self._left = end
        return out if out.dtype == hidden.dtype else out.to(hidden.dtype)

    def known(self, layer: int, ids: torch.Tensor) -> None:
        """The layer's routing, before its attention runs: the decision core's certain prefetch of its experts,
        queued now so the copies overlap attention (on CUDA; the CPU device copies at once)."""
        if layer not in self.core.known:
            return
        if layer == self.layers[0]:  # a step begins here, before its first experts call
            self.dev.new_step()
        now, syncs0 = self._now(), self.link.syncs
        ids_np = self.link.read([ids]).astype(np.int64)  # the one extra crossing of a known-routing layer
        counts = np.bincount(ids_np, minlength=self.n_expert)
        active = np.flatnonzero(counts)
        copy_free = self._copy_free_at(now)
        k = self.core.known_layer(layer, dict(zip(active.tolist(), counts[active].tolist())), ids.shape[0], now,
                                  copy_free)
        t_copy = time.perf_counter()
        for l, e, victim in k.prefetch:  # certain: the layer needs them right after its attention
            self._load(l, e, victim, DEMAND)
        if not self.dev.copy_engine.cuda:
            self._held_ms += (time.perf_counter() - t_copy) * 1e3
        st = self.stats
        st.prefetched += len(k.prefetch)
        st.prefetch_ms[layer] = st.prefetch_ms.get(layer, 0.0) + k.prefetch_s * 1e3
        st.syncs += self.link.syncs - syncs0
        if self.recorder is not None:
            self._known_clock[layer] = {"known_now": now, "known_copy": copy_free}

    def _read(self, layer: int, hidden, ids, weights, scores, pred_ids) -> "_HostView":
        """One packed device->host copy of the layer's routing, scores, CPU input and predictions, unpacked into
        numpy views (valid until the next layer's read)."""
        n, k = ids.shape
        if n == 1 and ids.dtype == torch.int32:  # the decode kernels' ids: their float32 copy lies in the buffer
            st = self.staging(1)
            if weights is st.weights and scores is st.scores:
                if hidden is not st.hidden:  # a layer whose attention took the torch path
                    st.hidden.copy_(hidden)
                ids, hidden = st.ids, st.hidden
        parts = [ids, weights, hidden] + ([scores] if scores is not None else []) \
            + ([pred_ids] if pred_ids is not None else [])
        buf = self.link.read(parts)
        o = 0

        def take(shape):
            nonlocal o
            size = int(np.prod(shape))
            v = buf[o:o + size].reshape(shape)
            o += size
            return v

        r = _HostView(take((n, k)).astype(np.int64), take((n, k)), take(tuple(hidden.shape)))
        if scores is not None:
            r.scores = take(tuple(scores.shape))
        if pred_ids is not None:
            r.pred = take(tuple(pred_ids.shape)).astype(np.int64)
        return r

    def _device_experts(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        experts: list[int], scratch: set[int]) -> torch.Tensor:
        """The device's share of a layer: sum over `experts` (resident, or in `scratch` for one use) of
        weight * expert(hidden) for the tokens routed to each, as float32 [n, d]. The ONE place device experts
        compute (the grouped-kernel seam)."""
        out = self.dev.run(layer, hidden, ids, weights, experts, scratch)  # grouped kernels: one launch pair
        for _ in scratch & set(experts):
            self._count_copy()
        return out

    # -- mechanics ----------------------------------------------------------------------------------------------
    def _new_pass(self, n_tokens: int, now: float) -> None:
        """A forward pass begins: the time since the last layer returned was the head, sampling, the embedding and
        this layer's dense part; the refitted cost model takes over for the pass's decisions."""
        self.stats.calls += 1
        self.dev.new_step()
        if self.refit is None:
            return
        if self._left is not None:
            self.refit.head(n_tokens, now - self._left)
        self._left = None
        self.refit.begin_pass(n_tokens)  # prompts and decode: fitted apart
        costs = self.refit.model()
        if costs != self.core.costs:
            self.core.set_costs(costs)

    def _copy_free_at(self, now: float) -> float:
        """When the copy engine drains, from its events (synchronous copies, without CUDA: done when issued)."""
        return self.dev.copy_engine.drain_ms(now)

    def _score_dict(self, ids_np, weights_np, n) -> dict[int, float]:
        """The selected weights averaged over the tokens, when the model gives no router scores."""
        w = np.bincount(ids_np, weights=weights_np.reshape(-1).astype(np.float64), minlength=self.n_expert) / n
        return {int(e): float(w[e]) for e in np.flatnonzero(w)}

    def _load(self, layer: int, e: int, victim: int | None, priority: int, need_by: float | None = None,
              now: float | None = None) -> bool:
        ok = self.dev.load(layer, e, victim, priority, need_by, now)
        if ok:
            self._count_copy()
        return ok

    def _count_copy(self) -> None:
        self.stats.copied_experts += 1
        self.stats.bytes_copied = self.dev.copy_engine.bytes_copied

    def _predict(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Layers l+1..l+3's experts predicted from this hidden state through their gates, on the device: one
        matmul over their stacked router weights, one top-k -> ids [n, targets, k] (None at the last layer)."""
        p = self._pred_gates.get(layer)
        if p is None:
            return None
        wt, bias, n_targets = p
        logits = torch.mm(hidden, wt) if bias is None else torch.addmm(bias, hidden, wt)
        return torch.topk(logits.view(hidden.shape[0], n_targets, self.n_expert), self.top_k, dim=-1).indices

    def _unpack_predictions(self, layer: int, pred: np.ndarray | None) -> dict[tuple[int, int], list[list[int]]]:
        """(target, distance) -> per-token predicted ids, from the host copy of `_predict`'s result."""
        if pred is None:
            return {}
        i = self.layers.index(layer)
        return {(target, d): pred[:, d - 1].tolist()
                for d, target in enumerate(self.layers[i + 1:i + 1 + pred.shape[1]], start=1)}


class _Staged(NamedTuple):
    ids: torch.Tensor  # [1, k] float32
    weights: torch.Tensor  # [1, k]
    hidden: torch.Tensor  # [1, d]
    scores: torch.Tensor  # [1, E]


@dataclass
class _HostView:
    ids: np.ndarray  # [n, k] int64
    weights: np.ndarray  # [n, k] float32
    hidden: np.ndarray  # [n, d] float32: the CPU experts' input
    scores: np.ndarray | None = None  # [n, E]
    pred: np.ndarray | None = None  # [n, targets, k] int64


def stacked_gates(transformer, layers: list[int], horizon: int = PREFETCH_DISTANCE) -> dict:
    """Per MoE layer, the router weights of the next `horizon` MoE layers as one [d, targets * E] view (and their
    biases), over one stack of every router: prediction is one matmul, no copy per step."""
    from moecli.models.layers import dense_weight

    routers = [transformer.layers[l].router for l in layers]
    if not routers:
        return {}
    w = torch.stack([dense_weight(r) for r in routers])  # [L, E, d]
    has_bias = any(r.bias is not None for r in routers)
    b = torch.stack([r.bias if r.bias is not None else torch.zeros(w.shape[1], device=w.device)
                     for r in routers]).to(w.dtype) if has_bias else None
    out = {}
    for i, l in enumerate(layers):
        j = min(i + 1 + horizon, len(layers))
        if j > i + 1:
            out[l] = (w[i + 1:j].reshape(-1, w.shape[-1]).t(), None if b is None else b[i + 1:j].reshape(-1), j - i - 1)
    return out


def core_record(layer: int, d, a) -> tuple:
    """What the decision core decided for one layer call (replays compare these)."""
    return (layer, d.cpu, d.device, d.copies, d.loads, d.scratch, a.prefetch, a.admits)
