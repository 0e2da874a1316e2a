"""SmallThinker's routing known one attention block early (its router reads the layer input): the executor and the
simulator give it to the decision core as a certain prefetch before the layer's attention, not as a prediction;
traces mark such layers (`known_early`) and `bench --simulate --routing known|predicted|both` compares the two."""
import json

import numpy as np
import pytest
from conftest import tiny_gguf

import moecli
from moecli.errors import MoecliError
from moecli.policy.cost import CostModel, build_cost_model, load_profile
from moecli.profile.store import resolve_profile
from moecli.policy.geometry import get_geometry
from moecli.policy.placement import get_placement
from moecli.sim.simulate import Simulator, calibration_counts
from moecli.sim.traces import LayerRouting, Pass, Sequence, Trace, read_trace, write_trace

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
# copying pays (CPU 1 ms/token + 1, device 0.1), and an expert's copy (0.5 ms) fits inside attention (2 ms)
COSTS = CostModel(cpu_a=1.0, cpu_b=1.0, cpu_first=0.0, dev_g0=0.1, dev_g1=0.0, copy_ms=0.5, expert_bytes=1000,
                  dense_fixed=2.0, head_ms=0.2)


def _fixed_costs(m, costs=COSTS):
    """The executor deciding with `costs` (no refit from this contended host's timings)."""
    ex = m.transformer.experts
    ex.refit = None
    ex.core.set_costs(costs)
    return ex


def test_trace_field_round_trips_and_hostile_values_are_one_error(tmp_path):
    tr = Trace("st", 8, 2, [0, 1, 2], [Sequence("0", [Pass("decode", {l: LayerRouting([[l, 3]]) for l in range(3)})])],
               known_early=[2, 0])
    p = tmp_path / "t.jsonl"
    write_trace(tr, p)
    assert json.loads(p.read_text().splitlines()[0])["known_early"] == [0, 2]
    assert read_trace(p).known_early == [0, 2]
    tr.known_early = []
    write_trace(tr, p)
    assert "known_early" not in p.read_text().splitlines()[0] and read_trace(p).known_early == []
    for bad in ([7], "all", [True]):
        lines = p.read_text().splitlines()
        head = json.loads(lines[0])
        head["known_early"] = bad
        q = tmp_path / "bad.jsonl"
        q.write_text("\n".join([json.dumps(head)] + lines[1:]) + "\n")
        with pytest.raises(MoecliError, match="known_early"):
            read_trace(q)


def test_simulated_known_prefetch_by_hand():
    """One layer, expert 5 routed, expert 0 cached. Known: 5 is copied 0-2 during attention (0-3), runs on the
    device 3-3.5, head 3.7. Predicted (nothing ahead to predict from): 5 on the CPU 3-5, head 5.2."""
    cm = CostModel(cpu_a=1.0, cpu_b=1.0, cpu_first=0.0, dev_g0=0.5, dev_g1=0.0, copy_ms=2.0, expert_bytes=1000,
                   dense_fixed=3.0, head_ms=0.2)
    passes = [Pass("decode", {0: LayerRouting([[5]])})]
    runs = {}
    for known in ((0,), ()):
        sim = Simulator(get_placement("hybrimoe"), cm, [0], 8, 1, {0: {0: 5}}, known=known)
        runs[known] = sim.run(passes)
    k, p = runs[(0,)], runs[()]
    assert k.pass_ms == pytest.approx([3.7]) and p.pass_ms == pytest.approx([5.2])
    assert k.hit_rate == 1.0 and k.prefetch_copies == 1 and k.prefetch_accuracy() == 1.0
    assert p.prefetch_copies == 0 and p.prefetch_accuracy() is None


def test_executor_prefetches_known_routing_before_attention_and_replays(tmp_path):
    """The hybrid executor on smallthinker: each layer's known prefetch is copied before its attention starts,
    only experts the layer then uses; logits equal the torch reference; the recorded trace marks every layer
    known-early and the simulator replays the executor's decisions (known prefetch included) one for one."""
    path = tiny_gguf("smallthinker", "F32")
    ref_model = moecli.load(path, engine="torch")
    ids = ref_model.tokenize(TEXT)
    m = moecli.load(path, placement="hybrimoe", expert_slots=2)
    ex = _fixed_costs(m)
    assert ex.known_layers == ex.layers and ex.core.known == set(ex.layers)
    events = []
    tr = m.transformer
    attn, load = tr.attention_block, ex.dev.load
    tr.attention_block = lambda l, *a, **k: events.append(("attn", l)) or attn(l, *a, **k)
    ex.dev.load = lambda l, e, v, *a: events.append(("load", l, e)) or load(l, e, v, *a)
    known = ex.known
    ex.known = lambda l, i: events.append(("known", l, i.reshape(-1).tolist())) or known(l, i)
    ex.core.log = executor_log = []
    out = tmp_path / "trace.jsonl"
    with m.record_trace(out):
        got = m.logits(ids)
        list(m.generate(ids[:6], max_tokens=6, stop_at_eog=False))
    ref = ref_model.logits(ids)
    assert np.abs(got - ref).max() / ref.std() < 1e-4

    # every known record's copies are loads of that layer issued between its routing and its attention
    prefetched = 0
    for i, ev in enumerate(events):
        if ev[0] != "known":
            continue
        l, routed = ev[1], set(ev[2])
        j = events.index(("attn", l), i)
        loads = [x for x in events[i + 1:j] if x[0] == "load"]
        assert all(x[1] == l and x[2] in routed for x in loads), (ev, loads)
        prefetched += len(loads)
    known_recs = [r for r in executor_log if r[0] == "known"]
    assert prefetched == sum(len(r[4]) for r in known_recs) > 0
    assert len(known_recs) == sum(1 for r in executor_log if r[0] == "plan")

    trace = read_trace(out)
    assert trace.known_early == trace.layers
    passes = trace.sequences[0].passes
    assert all("known_now" in r.clock for ps in passes for r in ps.layers.values())
    replay_log = []
    Simulator(get_placement("hybrimoe"), CostModel.from_dict(passes[0].costs), trace.layers, trace.n_experts, 2,
              {}, initial={}, recorded_clock=True, log=replay_log, known=trace.known_early).run(passes)
    assert replay_log == executor_log
    from moecli.bench.replay import compare

    assert compare(out)["replay"]["hit_rate"] == pytest.approx(m.stats.hit_rate)  # bench --replay: the same


@pytest.mark.parametrize("placement,slots,reads", [("hybrimoe", 2, 2), ("lru", 2, 1), ("llama-cpp", 0, 1)])
def test_known_routing_costs_one_read_per_layer_only_where_it_is_used(placement, slots, reads):
    """With a prefetcher the ids cross once more per layer, before attention; without one nothing changes."""
    m = moecli.load(tiny_gguf("smallthinker", "F32"), placement=placement, expert_slots=slots)
    ex = m.transformer.experts
    tr = m.transformer
    cache = tr.new_cache(16)
    tr.forward(m.tokenize(TEXT)[:8], cache)
    link = ex.link
    r0, w0, s0 = link.reads, link.writes, ex.stats.syncs
    tr.forward([5], cache)
    assert link.reads - r0 == reads * len(ex.layers)
    assert ex.stats.syncs - s0 == link.reads - r0 + link.writes - w0  # Stats.syncs counts it


def test_known_routing_prefetches_with_certainty_and_no_slower_on_a_recorded_trace(tmp_path):
    """A trace the executor recorded from the smallthinker fixture (its predictions from the gates), simulated with
    SmallThinker-21B's expert costs on the reference hosts: the certain prefetch's copies are all used (accuracy 1
    on those layers, while the gates' predictions are right about 2/3 of the time), and adding it to prediction
    ("both", the executor's way) is never slower than predicting those layers."""
    path = tiny_gguf("smallthinker", "F32")
    m = moecli.load(path, placement="hybrimoe", expert_slots=0)
    out = tmp_path / "trace.jsonl"
    with m.record_trace(out):
        list(m.generate(m.tokenize(TEXT), max_tokens=40, stop_at_eog=False))
    trace = read_trace(out)
    assert trace.known_early == trace.layers and trace.has_predictions
    passes = [ps for ps in trace.sequences[0].passes if ps.kind == "decode"]
    calib, evald = calibration_counts(passes[:10]), passes[10:]
    fired = 0
    for host in ("hybrimoe-testbed", "desktop-4090", "laptop-8gb"):
        costs = build_cost_model(load_profile(resolve_profile(host)), get_geometry("smallthinker-21b"))
        res = {}
        for mode, kw in (("known", {"known": trace.known_early, "routing": "known"}),
                         ("both", {"known": trace.known_early}), ("predicted", {})):
            res[mode] = Simulator(get_placement("hybrimoe"), costs, trace.layers, trace.n_experts, 2, calib,
                                  **kw).run(evald)
        k, b, p = res["known"], res["both"], res["predicted"]
        assert k.prefetch_accuracy(source="pred") is None and p.prefetch_accuracy(source="known") is None
        if k.prefetch_copies:
            fired += 1
            assert k.prefetch_accuracy(trace.known_early) == 1.0
            assert b.prefetch_accuracy(source="known") in (None, 1.0)
        assert p.prefetch_copies > 0 and p.prefetch_accuracy() < 0.9
        assert b.mean_ms <= p.mean_ms + 1e-9, (host, b.mean_ms, p.mean_ms)
    assert fired >= 2  # hosts where one attention block is long enough for a copy that pays

    # bench --simulate: the modes side by side (a geometry of 8 experts, as the fixture), prefetch accuracy shown
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moecli", "bench", "--simulate", "--trace", str(out), "--profile", "desktop-4090",
           "--model-geometry", "mixtral-8x7b", "--cache-ratio", "0.25", "--policies", "hybrimoe,lru"]
    r = subprocess.run(cmd + ["--routing", "both,known,predicted", "-o", "json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["results"]["0.25"]
    assert list(row) == ["hybrimoe", "hybrimoe/known", "hybrimoe/pred", "lru"]
    # Mixtral-sized experts: one attention block is too short for a copy that pays, so the certain prefetch
    # copies nothing here; predictions (from 1-3 layers back) still do
    assert row["hybrimoe/known"]["prefetch_accuracy"] in (None, 1.0)
    assert row["hybrimoe/pred"]["prefetch_accuracy"] < 0.9 and row["lru"]["prefetch_accuracy"] is None
    r = subprocess.run(cmd + ["--routing", "sure"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--routing" in r.stderr


def test_executor_keeps_predicting_known_layers_without_a_recorder():
    """routing "both" (the executor's): layers l+1..l+3 are still predicted from the gates and prefetched, then
    topped up with certainty; nothing about it depends on whether a trace is being recorded."""
    m = moecli.load(tiny_gguf("smallthinker", "F32"), placement="hybrimoe", expert_slots=2)
    ex = _fixed_costs(m)
    ex.core.log = log = []
    list(m.generate(m.tokenize(TEXT)[:8], max_tokens=6, stop_at_eog=False))
    assert not ex.core.known_only
    assert any(r[4] for r in log if r[0] == "after") and any(r[4] for r in log if r[0] == "known")
