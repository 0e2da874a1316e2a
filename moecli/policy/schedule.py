"""Intra-layer scheduling: which active expert runs on the CPU, on the device from the cache, or on the device after
a copy, and in which order on each resource. Everything is keyed by expert id.

Timeline model (shared by planner, simulator and executor): the CPU runs its experts back to back from
`cpu_free_at` (plus `first_ms` once if it runs any); the copy engine copies in `copies` order from `copy_free_at`;
the device runs `device` in order, each expert starting when the device is free and its weights are there
(cached: `ready_at` or immediately; copied: when its copy ends). The layer ends when all of them have.

- `GreedyScheduler`: HybriMoE's rules as the paper describes them (FACTS §4).
- `OptimalScheduler`: Johnson's rule for the copy→compute flow shop plus an enumeration of how many cached and how
  many uncached experts the device takes, each class by most tokens first, the CPU taking the rest. Exact when the
  device time per expert does not depend on the token count (g1 = 0) and copies cost the same within a layer; with
  g1 > 0 it is exact over that family and tests measure its gap to brute force.
- `BruteForceScheduler`: every subset (tests only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from moecli.policy.cost import CostModel

_NEG = float("-inf")


@dataclass
class Plan:
    cpu: list[int]       # CPU order
    device: list[int]    # device order: cached experts first, then the copied ones
    copies: list[int]    # copy-engine order (each also in `device`)
    makespan: float      # predicted absolute end of the layer
    cpu_end: float = 0.0
    dev_end: float = 0.0
    copy_end: float = 0.0
    extra: dict = field(default_factory=dict)

    def where(self, eid: int) -> str:
        if eid in self.cpu:
            return "cpu"
        return "copy" if eid in self.copies else "device"


def evaluate(tokens: dict[int, int], cpu: list[int], device: list[int], copies: list[int], costs: CostModel,
             cpu_free_at: float = 0.0, device_free_at: float = 0.0, copy_free_at: float = 0.0,
             ready_at: dict[int, float] | None = None) -> tuple[float, float, float, float]:
    """Timeline of a plan: (makespan, cpu_end, dev_end, copy_end)."""
    t_cpu = cpu_free_at
    if cpu:
        t_cpu += costs.cpu_first
        for e in cpu:
            t_cpu += costs.cpu(tokens[e])
    t_copy = copy_free_at
    arrive = {}
    for e in copies:
        t_copy += costs.copy_ms
        arrive[e] = t_copy
    t_dev = device_free_at
    ra = ready_at or {}
    for e in device:
        r = arrive.get(e)
        if r is None:
            r = ra.get(e, _NEG)
        if r > t_dev:
            t_dev = r
        t_dev += costs.dev_g0 + costs.dev_g1 * tokens[e]
    end = cpu_free_at
    if cpu:
        end = t_cpu
    if device and t_dev > end:
        end = t_dev
    return end, t_cpu, t_dev, t_copy


def _split(tokens: dict[int, int], cached) -> tuple[list[int], list[int]]:
    c, u = [], []
    for e in tokens:
        (c if e in cached else u).append(e)
    # Most tokens first; ties by id so plans are deterministic.
    c.sort(key=lambda e: (-tokens[e], e))
    u.sort(key=lambda e: (-tokens[e], e))
    return c, u


class OptimalScheduler:
    name = "exact"

    def plan(self, layer: int, tokens: dict[int, int], cached, costs: CostModel, device_free_at: float = 0.0,
             copy_free_at: float = 0.0, cpu_free_at: float = 0.0, ready_at: dict[int, float] | None = None,
             allow_copy: bool = True, span_only: bool = False) -> Plan | float:
        """The plan (or, with `span_only`, just its makespan: what prefetch's impact needs)."""
        C, U = _split(tokens, cached)
        if ready_at and any(e in ready_at for e in C):
            # Experts still arriving: the device prefix may favour most tokens or earliest arrival; try both.
            r = ready_at.get
            by_ready = sorted(C, key=lambda e: (r(e, _NEG), -tokens[e], e))
            C = sorted(C, key=lambda e: (-tokens[e], r(e, _NEG), e))
            p1 = self._plan(tokens, C, U, costs, device_free_at, copy_free_at, cpu_free_at, ready_at, allow_copy,
                            span_only)
            if by_ready == C:
                return p1
            p2 = self._plan(tokens, by_ready, U, costs, device_free_at, copy_free_at, cpu_free_at, ready_at,
                            allow_copy, span_only)
            if span_only:
                return min(p1, p2)
            return p2 if p2.makespan < p1.makespan - 1e-12 else p1
        return self._plan(tokens, C, U, costs, device_free_at, copy_free_at, cpu_free_at, ready_at, allow_copy,
                          span_only)

    @staticmethod
    def _plan(tokens, C, U, costs, device_free_at, copy_free_at, cpu_free_at, ready_at, allow_copy,
              span_only=False) -> Plan | float:
        cpu, g0, g1, c = costs.cpu, costs.dev_g0, costs.dev_g1, costs.copy_ms
        nC, nU = len(C), len(U)
        # CPU cost of the suffixes (what the CPU takes when the device takes a prefix).
        cpuC = [0.0] * (nC + 1)
        for i in range(nC - 1, -1, -1):
            cpuC[i] = cpuC[i + 1] + cpu(tokens[C[i]])
        cpuU = [0.0] * (nU + 1)
        for i in range(nU - 1, -1, -1):
            cpuU[i] = cpuU[i + 1] + cpu(tokens[U[i]])
        # Device end of the cached phase for each kc.
        devC = [device_free_at] * (nC + 1)
        if ready_at and any(e in ready_at for e in C):
            for kc in range(1, nC + 1):  # experts still arriving: run in order of arrival
                t = device_free_at
                for e in sorted(C[:kc], key=lambda e: ready_at.get(e, _NEG)):
                    t = max(t, ready_at.get(e, _NEG)) + g0 + g1 * tokens[e]
                devC[kc] = t
        else:
            t = device_free_at
            for kc in range(1, nC + 1):
                t += g0 + g1 * tokens[C[kc - 1]]
                devC[kc] = t
        # Copied phase: with equal copy times Johnson's order is most tokens first (longest compute first), so the
        # device end is max(devC + G(ku), G(ku) + max_j (copy_j end - G(j-1))).
        maxU = nU if allow_copy else 0
        G = [0.0] * (maxU + 1)
        M = [_NEG] * (maxU + 1)
        for j in range(1, maxU + 1):
            G[j] = G[j - 1] + g0 + g1 * tokens[U[j - 1]]
            M[j] = max(M[j - 1], copy_free_at + j * c - G[j - 1])
        best = None
        first = costs.cpu_first
        for ku in range(maxU + 1):
            for kc in range(nC + 1):
                rest = cpuC[kc] + cpuU[ku]
                on_cpu = (nC - kc) + (nU - ku)
                t_cpu = cpu_free_at + (first + rest if on_cpu else 0.0)
                if kc or ku:
                    t_dev = max(devC[kc] + G[ku], G[ku] + M[ku])
                    span = t_dev if t_dev > t_cpu else t_cpu
                else:
                    span = t_cpu
                if best is None or span < best[0] - 1e-12:
                    best = (span, kc, ku)
        span, kc, ku = best
        if span_only:
            return span
        dev = C[:kc]
        if ready_at:
            dev = sorted(dev, key=lambda e: ready_at.get(e, _NEG))
        copies = U[:ku]
        cpu = C[kc:] + U[ku:]
        cpu.sort(key=lambda e: (tokens[e], e))
        mk, tc, td, tcp = evaluate(tokens, cpu, dev + copies, copies, costs, cpu_free_at, device_free_at,
                                   copy_free_at, ready_at)
        return Plan(cpu, dev + copies, copies, mk, tc, td, tcp)


class GreedyScheduler:
    """HybriMoE's rules (paper): GPU queue = cached experts, most tokens first; CPU queue = uncached, fewest tokens
    first; an idle CPU steals from the GPU queue's tail when it would finish that expert sooner; the copy engine
    loads the m uncached experts with most tokens, each joining the GPU queue when loaded. Every m is simulated and
    the shortest makespan kept."""

    name = "greedy"

    def plan(self, layer: int, tokens: dict[int, int], cached, costs: CostModel, device_free_at: float = 0.0,
             copy_free_at: float = 0.0, cpu_free_at: float = 0.0, ready_at: dict[int, float] | None = None,
             allow_copy: bool = True) -> Plan:
        C, U = _split(tokens, cached)
        if ready_at:
            C.sort(key=lambda e: (ready_at.get(e, _NEG), -tokens[e], e))
        best = None
        for m in range(len(U) + 1 if allow_copy else 1):
            r = self._simulate(tokens, C, U, m, costs, device_free_at, copy_free_at, cpu_free_at, ready_at)
            if best is None or r[0] < best[0] - 1e-12:
                best = r
        span, cpu, dev, copies = best
        mk, tc, td, tcp = evaluate(tokens, cpu, dev, copies, costs, cpu_free_at, device_free_at, copy_free_at,
                                   ready_at)
        return Plan(cpu, dev, copies, mk, tc, td, tcp)

    @staticmethod
    def _simulate(tokens, C, U, m, costs, device_free_at, copy_free_at, cpu_free_at, ready_at):
        cpu, g0, g1 = costs.cpu, costs.dev_g0, costs.dev_g1
        copies = U[:m]
        cpu_q = U[m:][::-1]  # fewest tokens first
        ra = ready_at or {}
        gq = [(e, ra.get(e, _NEG), False) for e in C]
        gq += [(e, copy_free_at + (j + 1) * costs.copy_ms, True) for j, e in enumerate(copies)]
        head, tail = 0, len(gq)  # GPU takes from head, CPU steals from tail (cached experts only)
        t_cpu, t_dev = cpu_free_at, device_free_at
        cpu_done = dev_done = False
        cpu_order, dev_order = [], []
        qi = 0
        while not (cpu_done and dev_done):
            if not cpu_done and (dev_done or t_cpu <= t_dev):
                if qi < len(cpu_q):
                    e = cpu_q[qi]
                    qi += 1
                elif head < tail and not gq[tail - 1][2]:
                    e = gq[tail - 1][0]
                    # Would the GPU finish it later than the CPU would? Estimate its GPU finish through the queue.
                    t = t_dev
                    for k in range(head, tail):
                        t = max(t, gq[k][1]) + g0 + g1 * tokens[gq[k][0]]
                    if t_cpu + (0.0 if cpu_order else costs.cpu_first) + cpu(tokens[e]) < t:
                        tail -= 1
                    else:
                        cpu_done = True
                        continue
                else:
                    cpu_done = True
                    continue
                if not cpu_order:
                    t_cpu += costs.cpu_first
                t_cpu += cpu(tokens[e])
                cpu_order.append(e)
            else:
                if head < tail:
                    e, r, _ = gq[head]
                    if r > t_dev:  # wait for its weights without committing: the CPU may steal it meanwhile
                        t_dev = r
                        continue
                    head += 1
                    t_dev += g0 + g1 * tokens[e]
                    dev_order.append(e)
                else:
                    dev_done = True
        span = cpu_free_at
        if cpu_order:
            span = t_cpu
        if dev_order and t_dev > span:
            span = t_dev
        return span, cpu_order, dev_order, copies


class BruteForceScheduler:
    """Every device subset; cached experts first, copies in Johnson's order. For tests on small instances."""

    name = "brute"

    def plan(self, layer, tokens, cached, costs, device_free_at=0.0, copy_free_at=0.0, cpu_free_at=0.0,
             ready_at=None, allow_copy=True) -> Plan:
        ids = sorted(tokens)
        best = None
        for r in range(len(ids) + 1):
            for dev in combinations(ids, r):
                devc = [e for e in dev if e in cached]
                devu = [e for e in dev if e not in cached]
                if devu and not allow_copy:
                    continue
                g = {e: costs.dev(tokens[e]) for e in devu}
                c = costs.copy_ms
                first = sorted([e for e in devu if c < g[e]], key=lambda e: c)
                second = sorted([e for e in devu if c >= g[e]], key=lambda e: -g[e])
                copies = first + second
                devc.sort(key=lambda e: (ready_at or {}).get(e, _NEG))
                cpu = [e for e in ids if e not in dev]
                mk = evaluate(tokens, cpu, devc + copies, copies, costs, cpu_free_at, device_free_at,
                              copy_free_at, ready_at)
                if best is None or mk[0] < best[0].makespan - 1e-12:
                    best = (Plan(cpu, devc + copies, copies, *mk),)
        return best[0]


SCHEDULERS = {"greedy": GreedyScheduler, "exact": OptimalScheduler, "brute": BruteForceScheduler}
