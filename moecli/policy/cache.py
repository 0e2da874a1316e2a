"""Per-layer device expert caches with a fixed number of slots: MRS, LRU, LFU, static hot set, Belady's MIN.

One object holds every layer. The driver (simulator or executor), per layer per step:
    cache.update(layer, tokens_per_expert, scores)   # observe the router's decision (and scores when known)
    cache.cached(layer)                              # resident experts (set; do not mutate)
    cache.admit(layer, eid, protected)               # -> (admitted, evicted id or None)
`protected` = experts in use in the current step (and, for prefetch, those predicted for the target layer): no
policy evicts them. A policy may refuse (bypass) an admission: the expert then runs once from a scratch buffer.
"""
from __future__ import annotations

from bisect import bisect_right


class CachePolicy:
    name = "base"
    admits = True

    def __init__(self, n_layers: int, n_experts: int, slots: int, initial: dict[int, list[int]] | None = None):
        self.n_layers, self.n_experts, self.slots = n_layers, n_experts, slots
        self._sets: dict[int, set[int]] = {}
        self._clock = 0
        self._last: dict[int, list[int]] = {}  # last access step per expert (LRU order, tie-breaks)
        for layer, ids in (initial or {}).items():
            self._sets[layer] = set(list(ids)[:slots])

    def _layer_last(self, layer: int) -> list[int]:
        v = self._last.get(layer)
        if v is None:
            v = self._last[layer] = [-1] * self.n_experts
        return v

    def cached(self, layer: int) -> set[int]:
        s = self._sets.get(layer)
        if s is None:
            s = self._sets[layer] = set()
        return s

    def update(self, layer: int, tokens: dict[int, int], scores: dict[int, float] | None = None) -> None:
        self._clock += 1
        last = self._layer_last(layer)
        for e in tokens:
            last[e] = self._clock

    def _key(self, layer: int, e: int):
        """Eviction key: the lowest goes first."""
        return self._layer_last(layer)[e]

    def victim(self, layer: int, protected=()) -> int | None:
        best, bk = None, None
        for e in self.cached(layer):
            if e in protected:
                continue
            k = (self._key(layer, e), e)
            if bk is None or k < bk:
                best, bk = e, k
        return best

    def victims(self, layer: int, protected=(), n: int = 1) -> list[int | None]:
        """The next n slots an admission would take, in order: None for a free slot, else the expert evicted."""
        s = self.cached(layer)
        free = max(0, self.slots - len(s)) if self.admits else 0
        out: list[int | None] = [None] * min(n, free)
        if len(out) < n and self.admits:
            order = sorted((e for e in s if e not in protected), key=lambda e: (self._key(layer, e), e))
            out += order[: n - len(out)]
        return out

    def admit(self, layer: int, eid: int, protected=()) -> tuple[bool, int | None]:
        s = self.cached(layer)
        if eid in s:
            return True, None
        if self.slots <= 0 or not self.admits:
            return False, None
        if len(s) < self.slots:
            s.add(eid)
            return True, None
        v = self.victim(layer, protected)
        if v is None or not self._accept(layer, eid, v):
            return False, None
        s.discard(v)
        s.add(eid)
        return True, v

    def _accept(self, layer: int, eid: int, victim: int) -> bool:
        return True


class LRUCache(CachePolicy):
    name = "lru"


class LFUCache(CachePolicy):
    """Least frequently used, counting every activation (cached or not); ties go to the least recent."""

    name = "lfu"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._count: dict[int, list[int]] = {}

    def update(self, layer, tokens, scores=None):
        super().update(layer, tokens, scores)
        c = self._count.get(layer)
        if c is None:
            c = self._count[layer] = [0] * self.n_experts
        for e in tokens:
            c[e] += 1

    def _key(self, layer, e):
        c = self._count.get(layer)
        return (c[e] if c else 0, self._layer_last(layer)[e])


class MRSCache(CachePolicy):
    """HybriMoE's Minus Recent Score: S ← α·TopP(s) + (1−α)·S per layer, s the router's score vector (scores of
    experts outside the top-p count as 0, so they decay by (1−α)); evict the lowest S (ties: least recent).
    With traces that only carry the selected experts' probabilities, s is known on those only: TopP keeps them."""

    name = "mrs"

    def __init__(self, *a, alpha: float = 0.5, top_p: int | None = None, **k):
        super().__init__(*a, **k)
        self.alpha = alpha
        self.top_p = top_p
        self._S: dict[int, list[float]] = {}

    def update(self, layer, tokens, scores=None):
        super().update(layer, tokens, scores)
        S = self._S.get(layer)
        if S is None:
            S = self._S[layer] = [0.0] * self.n_experts
        if scores is None:  # no scores at all: selected experts count 1/k each
            scores = {e: 1.0 / max(1, len(tokens)) for e in tokens}
        items = scores.items() if isinstance(scores, dict) else enumerate(scores)
        p = self.top_p
        if p is not None and len(scores) > p:
            items = sorted(items, key=lambda kv: -kv[1])[:p]
        keep = 1.0 - self.alpha
        for i in range(self.n_experts):
            S[i] *= keep
        for e, v in items:
            S[e] += self.alpha * v

    def score(self, layer: int, e: int) -> float:
        S = self._S.get(layer)
        return S[e] if S else 0.0

    def _key(self, layer, e):
        return (self.score(layer, e), self._layer_last(layer)[e])


class StaticCache(CachePolicy):
    """kTransformers/Fiddler style: the most popular experts of a calibration profile, never changing."""

    name = "static"
    admits = False

    @staticmethod
    def hot_set(counts: dict[int, dict[int, int]], slots: int) -> dict[int, list[int]]:
        return {l: [e for e, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:slots]]
                for l, c in counts.items()}


class BeladyCache(CachePolicy):
    """Belady's MIN with bypass (offline oracle): evict the expert used farthest in the future, and refuse an
    admission when the incoming expert is needed later than that victim. `future[layer]` lists, in update order,
    the experts each step of that layer uses."""

    name = "belady"

    def __init__(self, *a, future: dict[int, list] | None = None, **k):
        super().__init__(*a, **k)
        self._uses: dict[int, dict[int, list[int]]] = {}
        for layer, steps in (future or {}).items():
            d: dict[int, list[int]] = {}
            for t, ids in enumerate(steps):
                for e in ids:
                    d.setdefault(e, []).append(t)
            self._uses[layer] = d
        self._pos: dict[int, int] = {}

    def update(self, layer, tokens, scores=None):
        super().update(layer, tokens, scores)
        self._pos[layer] = self._pos.get(layer, -1) + 1

    def next_use(self, layer: int, e: int) -> float:
        """Index of the next step (after the current one) that uses e; inf if never."""
        u = self._uses.get(layer, {}).get(e)
        if not u:
            return float("inf")
        i = bisect_right(u, self._pos.get(layer, -1))
        return u[i] if i < len(u) else float("inf")

    def _key(self, layer, e):
        return -self.next_use(layer, e)  # farthest next use = lowest key = evicted first

    def _accept(self, layer, eid, victim):
        # Uses in the current step are protected by the caller; compare the next uses after it.
        return self.next_use(layer, eid) < self.next_use(layer, victim)


CACHES = {"lru": LRUCache, "lfu": LFUCache, "mrs": MRSCache, "static": StaticCache, "belady": BeladyCache}
