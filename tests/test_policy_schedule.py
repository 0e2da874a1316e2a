import random

import pytest

from moecli.policy.cost import CostModel
from moecli.policy.schedule import BruteForceScheduler, GreedyScheduler, OptimalScheduler, evaluate


def _instance(rng, g1):
    cm = CostModel.simple(rng.uniform(0.1, 1), rng.uniform(0.1, 2), rng.uniform(0.05, 0.5), g1,
                          rng.uniform(0.2, 5), rng.uniform(0, 0.5))
    ids = rng.sample(range(32), rng.randint(1, 7))
    tok = {e: rng.randint(1, 40) for e in ids}
    cached = {e for e in ids if rng.random() < 0.4}
    ready = {e: rng.uniform(0, 3) for e in cached if rng.random() < 0.3}
    return cm, tok, cached, rng.uniform(0, 2), rng.uniform(0, 3), rng.uniform(0, 1), ready


def test_exact_matches_brute_force_with_token_independent_device_time():
    rng = random.Random(7)
    for _ in range(300):
        cm, tok, cached, df, cf, uf, _ = _instance(rng, 0.0)
        bf = BruteForceScheduler().plan(0, tok, cached, cm, df, cf, uf)
        ex = OptimalScheduler().plan(0, tok, cached, cm, df, cf, uf)
        assert ex.makespan == pytest.approx(bf.makespan, abs=1e-9)


def test_exact_never_worse_than_greedy_and_close_to_brute_force():
    rng = random.Random(11)
    gaps = []
    for _ in range(400):
        cm, tok, cached, df, cf, uf, ready = _instance(rng, rng.uniform(0, 0.02))
        bf = BruteForceScheduler().plan(0, tok, cached, cm, df, cf, uf, ready)
        ex = OptimalScheduler().plan(0, tok, cached, cm, df, cf, uf, ready)
        gr = GreedyScheduler().plan(0, tok, cached, cm, df, cf, uf, ready)
        assert bf.makespan <= ex.makespan + 1e-9
        assert bf.makespan <= gr.makespan + 1e-9
        assert ex.makespan <= gr.makespan + 1e-9
        gaps.append(ex.makespan / bf.makespan - 1)
    assert sum(gaps) / len(gaps) < 0.01


def test_plans_cover_every_expert_once_by_id():
    rng = random.Random(3)
    for _ in range(100):
        cm, tok, cached, df, cf, uf, ready = _instance(rng, 0.01)
        for s in (GreedyScheduler(), OptimalScheduler()):
            p = s.plan(0, tok, cached, cm, df, cf, uf, ready)
            assert sorted(p.cpu + p.device) == sorted(tok)
            assert set(p.copies) <= set(p.device) and not (set(p.copies) & cached)
            assert p.makespan == pytest.approx(evaluate(tok, p.cpu, p.device, p.copies, cm, uf, df, cf, ready)[0])


def test_hand_worked_decode_choice():
    # CPU 1.44 ms per expert, device 0.2, copy 8.27 (Mixtral on PCIe 3.0): copying never pays in decode;
    # the cached expert runs on the device, the other on the CPU.
    cm = CostModel.simple(0.25, 1.19, 0.2, 0.006, 8.27, 0.05)
    for s in (GreedyScheduler(), OptimalScheduler()):
        p = s.plan(0, {7: 1, 3: 1}, {3}, cm)
        assert p.cpu == [7] and p.device == [3] and p.copies == []
        assert p.makespan == pytest.approx(0.05 + 1.44)
    # Cheap copies and many tokens: copy the largest uncached expert and run it on the device.
    cm = CostModel.simple(1.0, 0.0, 0.1, 0.0, 0.5)
    p = OptimalScheduler().plan(0, {1: 10, 2: 1}, set(), cm)
    assert p.copies == [1] and p.cpu == [2] and p.makespan == pytest.approx(1.0)


def test_cpu_steals_an_arriving_expert_when_faster():
    cm = CostModel.simple(0.25, 1.19, 0.2, 0.0, 8.0)
    # Expert 2 is cached but its prefetch lands at t=5: the CPU should run both experts (end 2.88).
    for s in (GreedyScheduler(), OptimalScheduler()):
        p = s.plan(0, {2: 1, 3: 1}, {2}, cm, ready_at={2: 5.0})
        assert sorted(p.cpu) == [2, 3] and p.makespan == pytest.approx(2 * 1.44)
