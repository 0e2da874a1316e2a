from pathlib import Path

import pytest

from moecli.policy.cost import CostModel
from moecli.policy.placement import get_placement
from moecli.sim.simulate import Simulator, cache_study, calibration_counts
from moecli.sim.traces import LayerRouting, Pass, read_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
# CPU 1·n+1 ms, device 0.5 ms, copy 2 ms, dense 0.1 ms per layer, head 0.2 ms.
CM = CostModel(cpu_a=1.0, cpu_b=1.0, cpu_first=0.0, dev_g0=0.5, dev_g1=0.0, copy_ms=2.0, expert_bytes=1000,
               dense_fixed=0.1, head_ms=0.2)


def _passes(*steps):
    return [Pass("decode", {0: LayerRouting([list(s)])}) for s in steps]


def _sim(name, slots=1, calib=None):
    return Simulator(get_placement(name), CM, [0], 8, slots, calib or {0: {0: 5}})


def test_llama_cpp_timeline_by_hand():
    r = _sim("llama-cpp").run(_passes((0, 1), (2, 3)))
    # dense 0.1, CPU 2 + 2, head 0.2 -> 4.3 per token
    assert r.pass_ms == pytest.approx([4.3, 4.3]) and r.hit_rate == 0 and r.copied_bytes == 0


def test_ktransformers_timeline_by_hand():
    r = _sim("ktransformers").run(_passes((0, 1), (2, 3)))
    # token 1: expert 0 on the device 0.1-0.6, expert 1 on the CPU 0.1-2.1, head 2.3
    # token 2: both on the CPU: 4 ms, + dense + head
    assert r.pass_ms == pytest.approx([2.3, 4.3]) and r.hit_rate == pytest.approx(0.25)


def test_lru_background_admission_by_hand():
    # Two slots, the calibration hot set is {0}. With one slot and two experts in use, nothing could be admitted:
    # in-use experts are never evicted.
    assert _sim("lru", 1).run(_passes((0, 1), (0, 1))).copies == 0
    r = _sim("lru", 2).run(_passes((0, 1), (1, 2), (2, 0)))
    # token 1: 0 on the device 0.1-0.6, 1 on the CPU 0.1-2.1, head -> 2.3; the idle copy engine brings 1 into
    #          the free slot (2.1-4.1).
    # token 2: dense 2.3-2.4; 2 on the CPU 2.4-4.4; 1 arrives 4.1 -> device 4.1-4.6; end 4.6, head 4.8 (2.5 ms);
    #          copy engine idle: brings 2 in, evicting 0 (least recent) 4.6-6.6.
    # token 3: dense 4.8-4.9; 0 on the CPU 4.9-6.9; 2 arrives 6.6 -> device 6.6-7.1; head 7.3 (2.5 ms).
    assert r.pass_ms == pytest.approx([2.3, 2.5, 2.5])
    # ...and after token 3 the engine is idle again (6.6 <= 7.1): 0 comes back, evicting 1.
    assert r.copies == 3 and r.hit_rate == pytest.approx(0.5)


def test_layer_split_offloads_large_batches_like_llama_cpp():
    pre = [Pass("prefill", {0: LayerRouting([[0, 1]] * 40)})]
    r = _sim("llama-cpp").run(pre)
    # 40 tokens >= 32: the whole layer (8 experts) is copied (16 ms) then runs on the device (2 x 0.5)
    assert r.pass_ms == pytest.approx([0.1 + 16 + 1.0 + 0.2]) and r.copies == 8


def test_scheduler_placement_copies_when_it_pays():
    pre = [Pass("prefill", {0: LayerRouting([[0, 1]] * 10 + [[2, 3]])})]
    r = _sim("hybrimoe-sched").run(pre)
    # 0 cached; 1 has 10 tokens (CPU 11 ms) -> copy 2 ms + 0.5; 2, 3 on the CPU (2 + 2 ms)
    assert r.pass_ms == pytest.approx([0.1 + 4.0 + 0.2]) and r.copies == 1


@pytest.mark.skipif(not (TRACES / "mixtral-8x7b").is_dir(), reason="shared traces absent")
def test_belady_bounds_online_policies_on_mixtral_trace():
    tr = read_trace(TRACES / "mixtral-8x7b" / "gsm8k_2_routing.jsonl")
    calib, ev = tr.sequences[1].passes, tr.sequences[0].passes[:80]
    counts = calibration_counts(calib)
    for slots in (2, 4, 6):
        init = {l: sorted(c, key=lambda e: -c[e])[:slots] for l, c in counts.items()}
        hr = cache_study(ev, tr.layers, 8, slots, init)
        assert hr["belady"] >= max(v for k, v in hr.items() if k != "belady")
        if slots == 2:  # top-2 of 8 with 2 slots: every demand-fetch policy keeps exactly the last step's pair
            assert hr["lru"] == hr["mrs"] == hr["lfu"]


@pytest.mark.skipif(not (TRACES / "qwen1.5-moe-a2.7b").is_dir(), reason="shared traces absent")
def test_belady_bounds_online_policies_on_qwen_trace():
    tr = read_trace(TRACES / "qwen1.5-moe-a2.7b")
    ps = tr.sequences[0].passes
    counts = calibration_counts(ps[1:30])
    for slots in (15, 30):
        init = {l: sorted(c, key=lambda e: -c[e])[:slots] for l, c in counts.items()}
        hr = cache_study(ps[30:80], tr.layers, 60, slots, init)
        assert hr["belady"] >= max(v for k, v in hr.items() if k != "belady")
