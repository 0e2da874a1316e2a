"""The hybrid executor: HybriMoE's decisions on real tensors.

Per MoE layer and step, `HybridExperts(layer, hidden, ids, weights, scores)`:
  1. tokens per expert -> the scheduler's plan (CPU / device-cached / device-after-copy), or "run where they are";
  2. the CPU pairs go to the ggml worker thread (one graph, GIL released) while the device computes cached experts
     and then copied ones, each waiting only for its own copy;
  3. the cache policy observes the router's scores; missed experts are admitted when the copy engine is idle;
  4. prefetch: layers l+1..l+3's gates applied to this hidden state predict their experts; the highest-impact
     ones are copied while the copy engine would otherwise idle.
The policy objects are the simulator's (moecli/policy); only the clock differs: here it is measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from moecli.errors import MoecliError
from moecli.models.config import Checkpoint
from moecli.policy.cache import LFUCache, LRUCache, MRSCache, StaticCache
from moecli.policy.cost import CostModel
from moecli.policy.placement import Placement, get_placement
from moecli.policy.prefetch import ImpactPrefetcher, Target
from moecli.policy.schedule import GreedyScheduler, OptimalScheduler
from moecli.runtime.cpu_backend import GgmlExperts
from moecli.runtime.device_cache import DeviceExpertCache

PREFETCH_DISTANCE = 3  # layers ahead whose experts are predicted from the current hidden state


@dataclass
class Stats:
    """Counters per run; `step` holds the current forward pass's own counters."""

    active: int = 0  # (layer, expert) activations
    hits: int = 0  # of those, resident on the device when the layer started
    cpu_experts: int = 0
    device_experts: int = 0
    copied_experts: int = 0  # copies issued (demand, background and prefetch)
    prefetched: int = 0
    bytes_copied: int = 0
    layer_ms: dict[int, float] = field(default_factory=dict)  # total wall ms per layer
    calls: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.active if self.active else 0.0

    @property
    def cpu_share(self) -> float:
        n = self.cpu_experts + self.device_experts
        return self.cpu_experts / n if n else 1.0

    def as_dict(self) -> dict:
        return {"hit_rate": self.hit_rate, "active": self.active, "cpu_experts": self.cpu_experts,
                "device_experts": self.device_experts, "copied_experts": self.copied_experts,
                "prefetched": self.prefetched, "bytes_copied": self.bytes_copied, "cpu_share": self.cpu_share}


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
                 costs: CostModel | None = None, cpu: GgmlExperts | None = None, dtype=torch.float32):
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
        self.split_layers: set[int] = set()  # layer-split placements: layers whose experts all live on the device
        if self.p.mode == "layer-split":
            n_cpu = len(self.layers) if self.p.n_cpu_moe in (None, -1) else min(self.p.n_cpu_moe, len(self.layers))
            if self.p.n_cpu_moe is None:  # plain n-cpu-moe: as many device layers as the slots' bytes allow
                n_cpu = len(self.layers) - expert_slots * len(self.layers) // max(self.n_expert, 1)
            self.split_layers = set(self.layers[n_cpu:])
            expert_slots = self.n_expert if self.split_layers else 0
        self.slots = min(expert_slots, self.n_expert)
        self.dev = DeviceExpertCache(ckpt, self.device, self.slots, dtype)
        kinds = {"lru": LRUCache, "lfu": LFUCache, "mrs": MRSCache, "static": StaticCache, None: LRUCache}
        self.policy = kinds[self.p.cache](c.n_layer, self.n_expert, self.slots)
        self.sched = {"greedy": GreedyScheduler, "exact": OptimalScheduler}.get(self.p.scheduler, lambda: None)()
        self.prefetcher = ImpactPrefetcher(self.costs) if self.p.prefetch and self.slots else None
        self.stats = Stats()
        self.routers = None  # set by attach(): layer -> callable(hidden) -> router logits, for prediction
        self.recorder = None  # callable(layer, ids, weights, scores, predictions) for --record-trace
        self._copy_busy_until = 0.0  # perf_counter seconds when the copy engine drains (cost-model estimate)
        self._layer_ms = {}  # EMA of measured wall ms per layer, for prefetch deadlines
        self._pred: dict[int, dict[int, list[list[int]]]] = {}  # target layer -> distance -> predicted ids
        self._calibrated: set[int] = set()
        for l in self.split_layers:  # llama.cpp-style: whole layers resident from the start
            for e in range(self.n_expert):
                self.policy.admit(l, e)
                self._load(l, e, None)

    def attach(self, transformer) -> None:
        self.routers = {l: transformer.layers[l].router for l in self.layers}

    # -- the experts seam ---------------------------------------------------------------------------------------
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        n, k = ids.shape
        ids_np = ids.reshape(-1).cpu().numpy()
        counts = np.bincount(ids_np, minlength=self.n_expert)
        active = np.flatnonzero(counts)
        tokens = dict(zip(active.tolist(), counts[active].tolist()))
        resident = self.dev.resident[layer]
        if self.p.cache == "static" and layer not in self._calibrated:
            self._calibrate(layer, counts)
        st = self.stats
        st.active += len(tokens)
        st.hits += sum(1 for e in tokens if e in resident)

        if layer in self.split_layers:
            cpu_set, dev_list, copies = set(), list(tokens), []
        elif self.sched is not None and self.slots:
            plan = self.sched.plan(layer, tokens, set(resident), self.costs, 0.0, self._copy_free_in(), 0.0,
                                   self._ready_at(layer))
            cpu_set, dev_list, copies = set(plan.cpu), plan.device, plan.copies
        else:  # experts run where they are
            cpu_set = {e for e in tokens if e not in resident}
            dev_list, copies = [e for e in tokens if e in resident], []

        fut = None
        if cpu_set:  # CPU first so it overlaps everything below; pairs stay token-major (llama.cpp's order)
            mask = np.isin(ids_np, np.fromiter(cpu_set, dtype=np.int64))
            tok = np.repeat(np.arange(n, dtype=np.int32), k)[mask]
            w = weights.reshape(-1).float().cpu().numpy()[mask]
            h = hidden.float().cpu().contiguous()
            fut = self.cpu.engine.submit(layer, h, tok, ids_np[mask].astype(np.int32), w)
        st.cpu_experts += len(cpu_set)
        st.device_experts += len(dev_list)

        protected = set(tokens)
        scratch = set()
        for e in copies:
            admitted, victim = self.policy.admit(layer, e, protected)
            if admitted:
                self._load(layer, e, victim)
            else:
                scratch.add(e)
        out = self._device_experts(layer, hidden, ids, weights, dev_list, scratch)

        if layer not in self.split_layers and self.slots:
            self.policy.update(layer, tokens, self._score_dict(scores))
            if self.prefetcher is not None:
                self.prefetcher.observe(layer, tokens)
            predictions = self._prefetch(layer, hidden)
            if self.p.background_admit:
                self._admit_misses(layer, cpu_set, protected)
        else:
            predictions = {}
        if self.recorder is not None:
            self.recorder(layer, ids, weights, scores, self._pred.pop(layer, {}))
            for target, pred in predictions.items():
                self._pred.setdefault(target[0], {})[target[1]] = pred
        if fut is not None:
            out += fut.result().to(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        st.layer_ms[layer] = st.layer_ms.get(layer, 0.0) + ms
        self._layer_ms[layer] = 0.8 * self._layer_ms.get(layer, ms) + 0.2 * ms
        return out.to(hidden.dtype)

    def _device_experts(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        experts: list[int], scratch: set[int]) -> torch.Tensor:
        """The device's share of a layer: sum over `experts` (resident, or in `scratch` for one use) of
        weight * expert(hidden) for the tokens routed to each, as float32 [n, d]. The ONE place device experts
        compute (the grouped-kernel seam)."""
        out = torch.zeros_like(hidden, dtype=torch.float32)
        for e in experts:
            if e in scratch:
                self.dev.load_scratch(layer, e)
                self._count_copy()
            tok_idx, slot_idx = torch.nonzero(ids == e, as_tuple=True)
            y = self.dev.compute(layer, e, hidden[tok_idx], scratch=e in scratch)
            out.index_add_(0, tok_idx, y * weights[tok_idx, slot_idx, None].float())
        return out

    # -- mechanics ----------------------------------------------------------------------------------------------
    def _calibrate(self, layer: int, counts: np.ndarray) -> None:
        """kTransformers-style static hot set: the layer's most routed experts in the first pass (the prompt is the
        calibration; nothing later changes it)."""
        self._calibrated.add(layer)
        hot = sorted(range(self.n_expert), key=lambda e: (-int(counts[e]), e))[:self.slots]
        self.policy.cached(layer).update(hot)
        for e in hot:
            self._load(layer, e, None)

    def _load(self, layer: int, e: int, victim: int | None) -> None:
        if victim is not None:
            self.dev.evict(layer, victim)
        self.dev.load(layer, e)
        self._count_copy()

    def _count_copy(self) -> None:
        self.stats.copied_experts += 1
        self.stats.bytes_copied = self.dev.copy_engine.bytes_copied
        now = time.perf_counter()
        if self.dev.copy_engine.cuda:
            self._copy_busy_until = max(now, self._copy_busy_until) + self.costs.copy_ms / 1e3
        else:
            self._copy_busy_until = now  # synchronous copies: the engine is never behind

    def _copy_free_in(self) -> float:
        """Milliseconds until the copy engine drains (cost-model estimate of the copies queued)."""
        return max(0.0, (self._copy_busy_until - time.perf_counter()) * 1e3)

    def _ready_at(self, layer: int) -> dict[int, float]:
        busy = self._copy_free_in()
        return {e: busy for (l, e) in self.dev.pending if l == layer and e >= 0 and busy > 0}

    def _score_dict(self, scores: torch.Tensor | None) -> dict[int, float] | None:
        if scores is None:
            return None
        mean = scores.float().mean(0).cpu().numpy()
        return dict(enumerate(mean.tolist()))

    def _admit_misses(self, layer: int, missed: set[int], protected: set[int]) -> None:
        """Copy experts that just ran on the CPU into the cache while the copy engine is idle (most tokens first)."""
        for e in sorted(missed):
            if self._copy_free_in() > 0:
                break
            if e in self.dev.resident[layer]:
                continue
            admitted, victim = self.policy.admit(layer, e, protected)
            if admitted:
                self._load(layer, e, victim)

    def _prefetch(self, layer: int, hidden: torch.Tensor) -> dict[tuple[int, int], list[list[int]]]:
        """Predict layers l+1..l+3 from this hidden state through their gates; copy by impact."""
        if self.routers is None or (self.prefetcher is None and self.recorder is None):
            return {}
        i = self.layers.index(layer)
        targets, predictions, start = [], {}, 0.0
        for d, target in enumerate(self.layers[i + 1:i + 1 + PREFETCH_DISTANCE], start=1):
            start += self._layer_ms.get(target, 1.0)
            logits = self.routers[target](hidden)
            pred_ids = torch.topk(logits, self.top_k, dim=-1).indices
            predictions[(target, d)] = pred_ids.tolist()
            if self.prefetcher is None or target in self.split_layers:
                continue
            flat = pred_ids.reshape(-1).cpu().numpy()
            cnt = np.bincount(flat, minlength=self.n_expert)
            nz = np.flatnonzero(cnt)
            tokens = dict(zip(nz.tolist(), cnt[nz].tolist()))
            resident = self.dev.resident[target]
            room = sum(1 for e in resident if e not in tokens) + self.slots - len(resident)
            victims = self.policy.victims(target, protected=set(tokens), n=max(room, 0))
            targets.append(Target(target, tokens, set(resident), self._ready_at(target), start, room, victims))
        if targets:
            for target, e in self.prefetcher.choose(targets, self._copy_free_in()):
                protected = next(t.tokens.keys() for t in targets if t.layer == target)
                admitted, victim = self.policy.admit(target, e, set(protected))
                if admitted and e not in self.dev.resident[target]:
                    self._load(target, e, victim)
                    self.stats.prefetched += 1
        return predictions
