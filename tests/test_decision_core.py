"""One decision core for the executor and the simulator: a trace the executor recorded (routing, predictions, its
clock readings and refitted costs) replayed through the simulator reproduces every decision, layer by layer."""
import dataclasses

import pytest

import moecli
from conftest import TINY, cache_dir, tiny_gguf
from moecli.policy.core import DecisionCore, cpu_layer_count
from moecli.policy.cost import CostModel
from moecli.policy.placement import get_placement
from moecli.sim.simulate import Simulator
from moecli.sim.traces import read_trace

TEXT = "The quick brown fox jumps over the lazy dog. Experts route tokens to experts!"


def four_layer_model():
    """The tiny qwen3moe with 4 MoE layers: prefetch has targets 1-3 layers ahead."""
    from moecli.synth import write_gguf

    path = cache_dir() / "qwen3moe-4layers-F32.gguf"
    if not path.exists():
        garch, dims = TINY["qwen3moe"]
        write_gguf(path, garch, dataclasses.replace(dims, n_layer=4), 0, "F32")
    return path


@pytest.mark.parametrize("placement,slots", [("hybrimoe", 2), ("hybrimoe-exact", 3), ("lru", 3),
                                             ("ktransformers", 2), ("hybrimoe-prefetch", 1), ("n-cpu-moe", 4)])
def test_simulator_replays_the_executors_decisions(tmp_path, placement, slots):
    m = moecli.load(four_layer_model(), placement=placement, expert_slots=slots)
    ex = m.transformer.experts
    ex.core.log = executor_log = []
    out = tmp_path / "trace.jsonl"
    with m.record_trace(out):
        list(m.generate(m.tokenize(TEXT), max_tokens=10, stop_at_eog=False))
    trace = read_trace(out)
    passes = trace.sequences[0].passes
    assert all(r.clock for ps in passes for r in ps.layers.values()) and passes[0].costs
    replay_log = []
    sim = Simulator(get_placement(placement), CostModel.from_dict(passes[0].costs), trace.layers, trace.n_experts,
                    slots, {}, initial={}, recorded_clock=True, log=replay_log)
    sim.run(passes)
    assert len(replay_log) == len(executor_log) > 0
    for i, (got, want) in enumerate(zip(replay_log, executor_log)):
        assert got == want, (i, got, want)
    # the run decided something worth replaying: copies, and (with prefetch) prefetches
    kinds = {r[0] for r in executor_log}
    assert kinds == ({"plan"} if placement == "n-cpu-moe" else {"plan", "after"})
    if placement != "n-cpu-moe":
        assert ex.stats.copied_experts > 0
    if get_placement(placement).prefetch:
        assert ex.stats.prefetched > 0 and any(r[4] for r in executor_log if r[0] == "after")
    # the costs the executor decided with were refitted from its own timings
    assert passes[-1].costs != passes[0].costs


def test_layer_split_rounds_down_and_counts_device_layers_only():
    p = get_placement("n-cpu-moe")
    assert cpu_layer_count(p, 4, 3, 8) == 3  # 3/8 of 4 layers' bytes: one whole layer fits, not two
    assert cpu_layer_count(get_placement("n-cpu-moe=1"), 4, 0, 8) == 1
    assert cpu_layer_count(get_placement("llama-cpp"), 4, 8, 8) == 4
    core = DecisionCore(get_placement("n-cpu-moe=3"), CostModel.simple(1, 1, 0.5, 0, 2), [0, 1, 2, 3], 8, 8)
    assert core.device_layers == {3} and len(core.initial_loads()) == 8


def test_n_cpu_moe_allocates_slots_for_device_layers_only():
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), placement="n-cpu-moe=1", expert_slots=0)
    ex = m.transformer.experts
    assert ex.dev.layers == [1] and ex.dev.storage.shape[0] == 1
    cpu_only = moecli.load(tiny_gguf("qwen3moe", "F32"), placement="llama-cpp").transformer.experts
    assert cpu_only.dev.storage.numel() == 0


def test_cache_is_updated_before_planning():
    """MRS sees the current step's scores before it picks a victim: the expert the router just scored highest is
    not evicted by this step's own copy."""
    c = CostModel.simple(1.0, 1.0, 0.5, 0.0, 0.1)
    core = DecisionCore(get_placement("hybrimoe-cache"), c, [0], 8, 2, initial={0: [0, 1]})
    d = core.plan_layer(0, {2: 1, 0: 1}, {0: 0.9, 1: 0.0, 2: 0.1}, 1, 0.0, 0.0, 0.0)
    assert d.cached == {0} and d.cpu == [2]
    a = core.after_layer(0, d.tokens, d.cpu, {0: 0.9, 1: 0.0, 2: 0.1}, 1, 1.0, 0.0)
    assert a.admits == [(2, 1)]  # 1 (score 0) goes, 0 (just scored 0.9) stays


def test_arrivals_from_the_driver_replace_the_cores_predictions():
    """The executor's copy engine knows which copies are done (CUDA events): a copy the core predicted for later has
    arrived, and one it thought done is still on its way; the plan follows what the driver says."""
    c = CostModel.simple(1.0, 1.0, 2.0, 0.0, 0.1)
    core = DecisionCore(get_placement("hybrimoe"), c, [0, 1], 8, 4, initial={0: [0, 1]})
    core.inflight[(0, 0)] = 50.0  # predicted: expert 0's copy ends at 50 ms
    d = core.plan_layer(0, {0: 1, 1: 1}, None, 1, 10.0, 10.0, 10.0, arrivals={1: 12.0})
    assert d.ready == {1: 12.0}  # 0 arrived (not in arrivals), 1 still on its way
    assert (0, 0) not in core.inflight and core.inflight[(0, 1)] == 12.0
    d = core.plan_layer(0, {0: 1, 1: 1}, None, 1, 20.0, 20.0, 20.0)  # no arrivals: the core's own predictions
    assert d.ready == {}


def test_bench_replay_compares_simulator_with_the_recording_executor(tmp_path):
    import subprocess
    import sys

    from moecli.bench.replay import compare

    m = moecli.load(four_layer_model(), placement="hybrimoe", expert_slots=3)
    out = tmp_path / "trace.jsonl"
    with m.record_trace(out):
        list(m.generate(m.tokenize(TEXT), max_tokens=8, stop_at_eog=False))
    r = compare(out)
    # the replay makes the executor's decisions: its hit rate is the executor's
    assert r["replay"]["hit_rate"] == pytest.approx(m.stats.hit_rate)
    assert r["decode_passes"] == 6 and r["measured_tbt_ms"] > 0 and r["predicted_tbt_ms"] > 0
    cli = subprocess.run([sys.executable, "-m", "moecli", "bench", "--replay", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "simulated TBT / measured:" in cli.stdout and "| executor (measured) |" in cli.stdout
    bad = tmp_path / "plain.jsonl"
    bad.write_text(out.read_text().splitlines()[0].replace('"executor"', '"x"') + "\n")
    cli = subprocess.run([sys.executable, "-m", "moecli", "bench", "--replay", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode != 0 and cli.stderr.startswith("error:") and "executor trace" in cli.stderr
