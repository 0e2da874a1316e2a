"""The copy engine: priorities, back-pressure, per-slot ordering, never evicting what the step read, and logits that
do not change with copies delayed (the host implementation runs the CUDA engine's scheduling)."""
import numpy as np
import pytest
import torch

import moecli
from moecli.runtime.copy_engine import BACKGROUND, DEMAND, PREFETCH, CopyEngine
from moecli.runtime.device_cache import DeviceExpertCache, InUseError
from test_decision_core import four_layer_model

TEXT = "The quick brown fox jumps over the lazy dog. Experts route tokens to experts!"
PLACEMENTS = ["hybrimoe", "lru", "ktransformers", "llama-cpp", "n-cpu-moe=1", "hybrimoe-sched",
              "hybrimoe-prefetch", "hybrimoe-cache", "hybrimoe-exact"]


def _engine(copy_ms=1.0, slots=8, nbytes=16):
    dst = torch.zeros((slots, nbytes), dtype=torch.uint8)
    return CopyEngine("cpu", nbytes, copy_ms), dst


def _bytes(v, nbytes=16):
    return [np.full(nbytes, v, dtype=np.uint8)]


def test_priority_order_demand_first_then_prefetch_then_background():
    eng, dst = _engine()
    with eng.hold():
        for i, pr in enumerate([BACKGROUND, PREFETCH, DEMAND, PREFETCH, DEMAND, BACKGROUND]):
            eng.submit((0, i), dst[i], _bytes(i + 1), pr)
        assert eng.order == [] and eng.pending == 6  # held: nothing ran yet
    assert eng.order == [(DEMAND, (0, 2)), (DEMAND, (0, 4)), (PREFETCH, (0, 1)), (PREFETCH, (0, 3)),
                         (BACKGROUND, (0, 0)), (BACKGROUND, (0, 5))]
    assert [int(dst[i, 0]) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert eng.bytes_copied == 6 * 16


def test_demand_overtakes_queued_prefetch():
    eng, dst = _engine()
    with eng.hold():
        pf = [eng.submit((0, i), dst[i], _bytes(9), PREFETCH) for i in range(3)]
        d = eng.submit((0, 3), dst[3], _bytes(7), DEMAND)
        eng.wait(d)  # the compute needs it now: it runs, the queued prefetches do not
        assert eng.order == [(DEMAND, (0, 3))] and int(dst[3, 0]) == 7
        assert not any(eng.ready(j) for j in pf) and eng.pending == 3
        eng.wait(pf[1])  # a prefetch waited for runs after what is ahead of it in priority order, FIFO
        assert eng.order[1:] == [(PREFETCH, (0, 0)), (PREFETCH, (0, 1))] and not eng.ready(pf[2])
    assert eng.ready(pf[2])


def test_back_pressure_refuses_prefetch_that_cannot_arrive_in_time():
    eng, dst = _engine(copy_ms=1.0)
    now = 100.0
    with eng.hold():
        for i in range(3):  # 3 ms of prefetch queued
            assert eng.submit((0, i), dst[i], _bytes(1), PREFETCH, need_by=now + 50, now=now) is not None
        for i in range(5):  # background copies do not delay a prefetch (it goes ahead of them)
            eng.submit((1, i), dst[i], _bytes(2), BACKGROUND)
        assert eng.drain_ms(now, PREFETCH) == pytest.approx(now + 3.0)
        assert eng.drain_ms(now) == pytest.approx(now + 8.0)
        assert eng.submit((0, 3), dst[3], _bytes(3), PREFETCH, need_by=now + 2.5, now=now) is None
        assert eng.refused == 1 and eng.pending == 8
        assert eng.submit((0, 3), dst[3], _bytes(3), PREFETCH, need_by=now + 3.5, now=now) is not None
        assert eng.submit((0, 4), dst[4], _bytes(4), DEMAND, need_by=now, now=now) is not None  # never refused
    assert eng.drain_ms(now) == now and eng.pending == 0


def test_arrivals_are_the_queue_in_priority_order_and_vanish_when_done():
    eng, dst = _engine(copy_ms=1.0)
    now = 10.0
    with eng.hold():
        jobs = {e: eng.submit((0, e), dst[e], _bytes(e), pr) for e, pr in [(0, BACKGROUND), (1, PREFETCH), (2, DEMAND)]}
        eng.cancel(jobs[0])
        assert eng.arrivals(jobs, now) == pytest.approx({2: now + 1.0, 1: now + 2.0})  # demand first; 0 cancelled
        eng.wait(jobs[2])
        assert eng.arrivals(jobs, now) == pytest.approx({1: now + eng.copy_ms})  # done: absent (it is there)
    assert eng.arrivals(jobs, now) == {}


def test_copy_into_a_slot_waits_only_for_that_slots_last_read():
    eng, dst = _engine()
    eng.mark_read([(0, 0)])
    j1 = eng.submit((0, 1), dst[1], _bytes(1))
    j0 = eng.submit((0, 0), dst[0], _bytes(1))
    assert j1.after_read is None and j0.after_read is not None  # (CUDA: the slot's read event, nothing else)
    eng.mark_read([(0, 1)])
    assert eng.submit((0, 1), dst[1], _bytes(2)).after_read is not j0.after_read
    with eng.hold():  # a queued copy whose slot goes to another expert never runs
        a = eng.submit((0, 5), dst[5], _bytes(5), PREFETCH)
        b = eng.submit((0, 5), dst[5], _bytes(6), DEMAND)
        assert a.state == "cancelled" and b.after_write is None
    assert eng.order[-1] == (DEMAND, (0, 5)) and (PREFETCH, (0, 5)) not in eng.order and int(dst[5, 0]) == 6


def test_an_expert_read_in_this_step_is_never_evicted():
    m = moecli.load(four_layer_model(), engine="torch")
    cache = DeviceExpertCache(m.checkpoint, "cpu", 1)
    l = cache.layers[0]
    x = torch.randn(2, m.config.n_embd)
    cache.load(l, 0)
    y0 = cache.compute(l, 0, x)
    with pytest.raises(InUseError):
        cache.load(l, 1, evict=0)
    with pytest.raises(InUseError):
        cache.evict(l, 0)
    assert cache.resident[l] == {0: 0}
    cache.new_step()
    assert cache.load(l, 1, evict=0) and cache.resident[l] == {1: 0}
    cache.new_step()
    cache.load(l, 0, evict=1)
    assert torch.equal(cache.compute(l, 0, x), y0)


def test_logits_unchanged_with_copies_delayed_for_every_placement():
    """Copies held in the queue until compute needs them (a busy engine): same logits as the reference, and the
    decision core's cache and the device's agree afterwards."""
    path = four_layer_model()
    ref_m = moecli.load(path, engine="torch")
    ids = ref_m.tokenize(TEXT)
    ref = ref_m.logits(ids)
    for placement in PLACEMENTS:
        m = moecli.load(path, placement=placement, expert_slots=2)
        ex = m.transformer.experts
        with ex.dev.copy_engine.hold():
            got = m.logits(ids)
            step = list(m.generate(ids, max_tokens=3, stop_at_eog=False))
        assert np.abs(got - ref).max() / ref.std() < 1e-4, placement
        assert step == list(ref_m.generate(ids, max_tokens=3, stop_at_eog=False)), placement
        if ex.core.cache is not None:
            for l in ex.layers:
                assert set(ex.dev.resident[l]) == ex.core.cache.cached(l), (placement, l)


def test_prefetch_refused_by_back_pressure_leaves_cache_consistent():
    """A slow engine (a huge copy estimate) with copies queued: prefetches are refused, the core forgets them, the
    logits stay exact."""
    path = four_layer_model()
    ref_m = moecli.load(path, engine="torch")
    ids = ref_m.tokenize(TEXT)
    want = list(ref_m.generate(ids, max_tokens=6, stop_at_eog=False))
    m = moecli.load(path, placement="hybrimoe-prefetch", expert_slots=2)
    ex = m.transformer.experts
    ex.refit = None  # keep the huge estimate
    ex.dev.copy_engine.copy_ms = 1e6
    with ex.dev.copy_engine.hold():
        got = list(m.generate(ids, max_tokens=6, stop_at_eog=False))
    assert got == want
    assert ex.stats.prefetch_refused > 0 and ex.stats.as_dict()["prefetch_refused"] == ex.stats.prefetch_refused
    for l in ex.layers:
        assert set(ex.dev.resident[l]) == ex.core.cache.cached(l), l


def test_registered_spans_are_page_aligned_and_merged():
    from moecli.runtime.copy_engine import page_spans

    assert page_spans([(4096 * 3 + 10, 100), (100, 4000), (4096 + 5, 4096 * 2), (0, 0)]) == [(0, 4096 * 4)]
    assert page_spans([(0, 4096), (4096 * 5, 1)]) == [(0, 4096), (4096 * 5, 4096 * 6)]


def test_engine_choice_by_device():
    from moecli.runtime.copy_engine import CudaCopyEngine, make_copy_engine

    eng = make_copy_engine("cpu", 64)
    assert type(eng) is CopyEngine and not eng.asynchronous
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the staging workers run only there")
    cu = make_copy_engine("cuda", 64, copy_ms=1.0)  # on a GPU: the same scheduling, completion from events
    assert isinstance(cu, CudaCopyEngine)
    dst = torch.zeros((4, 64), dtype=torch.uint8, device="cuda")
    jobs = [cu.submit((0, i), dst[i], [np.full(64, i + 1, np.uint8)], pr) for i, pr in
            enumerate([BACKGROUND, PREFETCH, DEMAND, DEMAND])]
    for j in jobs:
        cu.wait(j)
    torch.cuda.synchronize()
    assert dst[:, 0].tolist() == [1, 2, 3, 4] and all(cu.ready(j) for j in jobs)
    assert cu.take_times() and cu.copy_ms > 0
    cu.close()
