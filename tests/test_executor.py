"""The hybrid executor: numerics do not depend on placement, and the policies really move experts."""
import json

import numpy as np
import pytest

import moecli
from conftest import tiny_gguf

TEXT = "The quick brown fox jumps over the lazy dog. Experts route tokens to experts!"
PLACEMENTS = ["hybrimoe", "lru", "ktransformers", "llama-cpp", "n-cpu-moe=1", "hybrimoe-sched",
              "hybrimoe-prefetch", "hybrimoe-cache", "hybrimoe-exact"]
MOE_ARCHS = ["mixtral", "qwen2moe", "qwen3moe", "olmoe"]


def _ref(path):
    m = moecli.load(path, engine="torch")
    ids = m.tokenize(TEXT)
    return m, ids, m.logits(ids)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_placement_and_slot_count_matches_reference_f32(arch):
    path = tiny_gguf(arch, "F32")
    ref_model, ids, ref = _ref(path)
    scale = ref.std()
    for placement in PLACEMENTS:
        for slots in (0, 1, 3, 8):
            m = moecli.load(path, placement=placement, expert_slots=slots)
            got = m.logits(ids)
            assert np.abs(got - ref).max() / scale < 1e-4, (placement, slots)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K", "Q4_K_M"])
def test_quantized_placements_within_oracle_spread(ftype):
    """ggml (Q8 activations) and torch (fp32 activations) legitimately differ on quantized weights (FACTS §3):
    a placement mixing them moves logits by at most that spread."""
    path = tiny_gguf("qwen3moe", ftype)
    m_cpu = moecli.load(path, engine="ggml")
    ids = m_cpu.tokenize(TEXT)
    cpu = m_cpu.logits(ids)
    dev = moecli.load(path, engine="torch").logits(ids)
    # per-token max |dlogit|; a near-tie routed the other way moves one token a lot, so compare medians
    spread = np.median(np.abs(cpu - dev).max(-1))
    for placement, slots in (("hybrimoe", 3), ("lru", 8), ("ktransformers", 2)):
        got = moecli.load(path, placement=placement, expert_slots=slots).logits(ids)
        assert np.median(np.abs(got - cpu).max(-1)) <= spread * 1.5 + 1e-5, placement
        assert (got.argmax(-1) == cpu.argmax(-1)).mean() >= 0.9


def test_greedy_generation_token_identical_across_placements():
    path = tiny_gguf("mixtral", "F32")
    ref_model = moecli.load(path, engine="torch")
    ids = ref_model.tokenize(TEXT)
    want = list(ref_model.generate(ids, max_tokens=24, stop_at_eog=False))
    for placement, slots in (("hybrimoe", 2), ("lru", 4), ("llama-cpp", 0), ("n-cpu-moe=1", 0)):
        m = moecli.load(path, placement=placement, expert_slots=slots)
        assert list(m.generate(ids, max_tokens=24, stop_at_eog=False)) == want, placement


def test_stats_reflect_placement():
    path = tiny_gguf("qwen3moe", "F32")
    ids = moecli.load(path, engine="torch").tokenize(TEXT)

    def run(placement, slots):
        m = moecli.load(path, placement=placement, expert_slots=slots)
        list(m.generate(ids, max_tokens=16, stop_at_eog=False))
        return m.stats

    cpu_only = run("llama-cpp", 0)
    assert cpu_only.device_experts == 0 and cpu_only.copied_experts == 0 and cpu_only.hit_rate == 0
    full = run("lru", 8)  # every expert fits: after warm-up everything hits
    assert full.hit_rate > 0.5 and full.bytes_copied > 0
    assert full.copied_experts <= 8 * 2  # each expert of each layer copied at most once
    hy = run("hybrimoe", 2)
    assert hy.active > 0 and 0 <= hy.hit_rate <= 1
    assert hy.cpu_experts + hy.device_experts >= hy.active  # scratch/bypass runs count too
    static = run("ktransformers", 2)
    assert static.copied_experts == 2 * 2  # the calibrated hot set, loaded once, never changes


def test_in_use_experts_are_never_evicted():
    """With 1 slot and top-2 routing, the layer's active experts must still compute correctly."""
    path = tiny_gguf("mixtral", "F32")
    ref_model, ids, ref = _ref(path)
    m = moecli.load(path, placement="hybrimoe-exact", expert_slots=1)
    assert np.abs(m.logits(ids) - ref).max() / ref.std() < 1e-4


def test_oracle_placement_is_refused_clearly():
    with pytest.raises(moecli.api.MoecliError, match="offline"):
        moecli.load(tiny_gguf("mixtral", "F32"), placement="oracle", expert_slots=2)


def test_record_trace_round_trips(tmp_path):
    from moecli.sim.traces import read_trace

    path = tiny_gguf("qwen3moe", "F32")
    m = moecli.load(path, placement="hybrimoe", expert_slots=2)
    out = tmp_path / "trace.jsonl"
    with m.record_trace(out):
        list(m.generate(m.tokenize(TEXT), max_tokens=6, stop_at_eog=False))
    head = json.loads(out.read_text().splitlines()[0])
    assert head["format"] == "moecli-trace" and head["n_experts"] == 8 and head["top_k"] == 2
    trace = read_trace(out)
    passes = trace.sequences[0].passes
    assert passes[0].kind == "prefill" and all(p.kind == "decode" for p in passes[1:])
    assert len(passes) == 6  # the prompt, then 5 decode steps (the 6th token is sampled, not fed)
    assert trace.full_scores and trace.has_predictions
    assert passes[1].layers[1].pred[1]  # layer 1's experts predicted from layer 0's hidden state


def test_chat_record_trace_cli(tmp_path):
    import subprocess
    import sys

    from moecli.sim.traces import read_trace

    out = tmp_path / "chat-trace.jsonl"
    proc = subprocess.run([sys.executable, "-m", "moecli", "chat", str(tiny_gguf("qwen2moe", "Q8_0")), "-p", "hello",
                           "-n", "4", "--temperature", "0", "--placement", "hybrimoe", "--expert-slots", "2",
                           "--record-trace", str(out), "-v"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CPU/GPU" in proc.stderr or "CPU" in proc.stderr
    trace = read_trace(out)
    assert trace.n_experts == 8 and trace.full_scores and len(trace.sequences[0].passes) >= 2
