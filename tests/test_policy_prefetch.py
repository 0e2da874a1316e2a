import pytest

from moecli.policy.cost import CostModel
from moecli.policy.prefetch import ImpactPrefetcher, NoisyPredictor, Target
from moecli.policy.placement import PLACEMENTS, get_placement
from moecli.errors import MoecliError

CM = CostModel.simple(1.0, 0.0, 0.1, 0.0, 1.0)  # CPU n ms, device 0.1, copy 1


def test_picks_highest_impact_first_and_respects_layer_start():
    pf = ImpactPrefetcher(CM)
    t = Target(layer=5, tokens={1: 8, 2: 2, 3: 1}, cached=set(), ready_at={}, start_at=10.0, room=2)
    picks = pf.choose([t], copy_free_at=0.0)
    assert picks[0] == (5, 1) and len(picks) == 2
    # Copy engine busy until after the layer starts: nothing.
    assert pf.choose([t], copy_free_at=10.0) == []
    # No room: nothing.
    assert pf.choose([Target(5, {1: 8}, set(), {}, 10.0, 0)], 0.0) == []


def test_impact_is_zero_for_cached_and_eviction_cost_blocks_weak_picks():
    pf = ImpactPrefetcher(CostModel.simple(0.25, 1.19, 0.2, 0.0, 8.0))
    assert pf.choose([Target(1, {4: 1}, {4}, {}, 100.0, 1)], 0.0) == []
    for _ in range(30):
        pf.observe(1, {7: 1})  # expert 7 is hot: evicting it costs more than one predicted use saves
    t = Target(1, {4: 1}, {7}, {}, 100.0, 1, victims=[7], confidence=0.5)
    assert pf.choose([t], 0.0) == []
    t = Target(1, {4: 1}, {7}, {}, 100.0, 1, victims=[None], confidence=0.5)
    assert pf.choose([t], 0.0) == [(1, 4)]


def test_noisy_predictor_accuracy():
    pr = NoisyPredictor(64, accuracy=0.8, seed=1)
    rows = [[i % 64, (i + 1) % 64] for i in range(2000)]
    hit = 0
    for k in range(50):
        pred = pr.predict(rows[k * 40:(k + 1) * 40], 1, (k,))
        true = {}
        for r in rows[k * 40:(k + 1) * 40]:
            for e in r:
                true[e] = true.get(e, 0) + 1
        hit += sum(min(pred.get(e, 0), n) for e, n in true.items())
    assert hit / 4000 == pytest.approx(0.8, abs=0.05)
    assert pr.predict([[1, 2]], 2, (0,)) == pr.predict([[1, 2]], 2, (0,))  # deterministic


def test_named_placements():
    assert {"llama-cpp", "n-cpu-moe", "ktransformers", "lru", "hybrimoe", "hybrimoe-sched", "hybrimoe-prefetch",
            "hybrimoe-cache", "oracle"} <= set(PLACEMENTS)
    assert get_placement("n-cpu-moe=12").n_cpu_moe == 12
    with pytest.raises(MoecliError):
        get_placement("n-cpu-moe=x")
    with pytest.raises(MoecliError):
        get_placement("fastest")
