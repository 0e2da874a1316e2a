import pytest

from moecli.policy.cache import BeladyCache, LFUCache, LRUCache, MRSCache, StaticCache


def _run(cache, steps, layer=0):
    """Admit every miss; return the hit count."""
    hits = 0
    for ids, scores in steps:
        tok = {e: 1 for e in ids}
        cache.update(layer, tok, scores)
        s = cache.cached(layer)
        hits += sum(e in s for e in ids)
        for e in ids:
            if e not in s:
                cache.admit(layer, e, tok)
        assert all(e in s for e in ids) or isinstance(cache, (BeladyCache, StaticCache))
        assert len(s) <= cache.slots
    return hits


def test_lru_hand_worked():
    c = LRUCache(1, 4, 2)
    seq = [([0], None), ([1], None), ([0], None), ([2], None), ([1], None), ([0], None)]
    # 0 m, 1 m, 0 h, 2 m (evicts 1), 1 m (evicts 0), 0 m (evicts 2)
    assert _run(c, seq) == 1
    assert c.cached(0) == {0, 1}


def test_mrs_hand_worked_uses_scores():
    c = MRSCache(1, 4, 2, alpha=0.5)
    # S after step 1: e0 .45 e1 .05 ; step 2: e1 .425 e0 .225 ; step 3 (e2 .5): e0 .1125 e1 .2125 -> evict e0
    c.update(0, {0: 1}, {0: 0.9, 1: 0.1})
    c.admit(0, 0)
    c.update(0, {1: 1}, {1: 0.8, 0: 0.0})
    c.admit(0, 1)
    assert c.score(0, 0) == pytest.approx(0.225) and c.score(0, 1) == pytest.approx(0.425)
    c.update(0, {2: 1}, {2: 1.0})
    ok, ev = c.admit(0, 2, {2})
    assert ok and ev == 0 and c.cached(0) == {1, 2}
    # LRU would have evicted the least recent (0) too; now make scores disagree with recency:
    c2 = MRSCache(1, 4, 2, alpha=0.5)
    c2.update(0, {0: 1}, {0: 1.0})
    c2.admit(0, 0)
    c2.update(0, {1: 1}, {1: 0.1})   # 1 used more recently but with a small score
    c2.admit(0, 1)
    c2.update(0, {2: 1}, {2: 1.0})
    assert c2.admit(0, 2, {2}) == (True, 1)


def test_mrs_top_p_keeps_unselected_scores():
    c = MRSCache(1, 8, 2, alpha=0.5, top_p=4)
    c.update(0, {0: 1, 1: 1}, [0.4, 0.3, 0.2, 0.05, 0.05, 0.0, 0.0, 0.0])
    assert c.score(0, 2) == pytest.approx(0.1)  # third expert, not selected, gets credit
    assert c.score(0, 5) == 0.0


def test_belady_hand_worked_with_bypass():
    seq = [[0], [1], [2], [0], [1], [0]]
    c = BeladyCache(1, 4, 2, future={0: seq})
    hits = _run(c, [(s, None) for s in seq])
    # MIN: 0 m, 1 m, 2 m -> bypass (next use of 2 never), 0 h, 1 h, 0 h
    assert hits == 3


def test_belady_beats_online_policies_on_random_sequences():
    import random
    rng = random.Random(5)
    for _ in range(20):
        seq = [rng.sample(range(8), 2) for _ in range(60)]
        res = {}
        for cls in (LRUCache, LFUCache, MRSCache, BeladyCache):
            c = cls(1, 8, 3, future={0: seq}) if cls is BeladyCache else cls(1, 8, 3)
            res[cls.name] = _run(c, [(s, None) for s in seq])
        assert res["belady"] >= max(res.values())


def test_no_policy_evicts_protected_and_static_never_changes():
    for cls in (LRUCache, LFUCache, MRSCache):
        c = cls(1, 8, 2, {0: [0, 1]})
        assert c.victim(0, {0, 1}) is None
        assert c.admit(0, 5, {0, 1}) == (False, None)
        assert c.cached(0) == {0, 1}
    s = StaticCache(1, 8, 2, {0: [3, 4]})
    s.update(0, {5: 1})
    assert s.admit(0, 5, {5}) == (False, None) and s.cached(0) == {3, 4}
    assert StaticCache.hot_set({0: {1: 5, 2: 9, 3: 1}}, 2) == {0: [2, 1]}


def test_two_slots_top2_all_demand_policies_alike():
    import random
    rng = random.Random(2)
    seq = [rng.sample(range(8), 2) for _ in range(200)]
    caches = [LRUCache(1, 8, 2), LFUCache(1, 8, 2), MRSCache(1, 8, 2)]
    hits = {_run(c, [(s, None) for s in seq]) for c in caches}
    assert len(hits) == 1  # after each step the cache is exactly the step's two experts
