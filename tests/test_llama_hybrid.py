"""llama.cpp's own hybrid for `bench --vs-llama-cpp`: the tensor buffer-type overrides --n-cpu-moe N builds, passed
through llama_model_params.tensor_buft_overrides. On this CPU-only build llama.cpp loads them (-ngl 99), says for
exactly the expert tensors of the CPU layers that their buffer type was overridden, and computes the same logits
as the plain CPU run."""
from __future__ import annotations

import re

import llama_cpp.llama_cpp as L
import numpy as np
import pytest

from conftest import tiny_gguf
from llama_oracle import _context, _decode, _logits, _n_vocab
from moecli import synth
from moecli.bench import llama_hybrid as H
from moecli.bench import run as R

TOKENS = [1, 5, 9, 17, 33, 65, 2, 4]


def _logits_of(path, ngl: int = 0, overrides: H.Overrides | None = None) -> tuple[np.ndarray, list[str]]:
    """All-token logits of TOKENS, and llama.cpp's log lines of the load."""
    lines: list[str] = []

    @L.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        lines.append(text.decode(errors="replace"))

    L.llama_backend_init()
    L.llama_log_set(cb, None)
    try:
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = ngl
        if overrides is not None:
            overrides.apply(mp)
        model = L.llama_model_load_from_file(str(path).encode(), mp)
    finally:
        synth._LOG_CB = None
        synth._quiet_llama_log()  # the tests' quiet log again (our callback dies with this frame)
    assert model, "".join(lines[-5:])
    try:
        with _context(model, len(TOKENS)) as ctx:
            _decode(ctx, TOKENS, 0, all_logits=True)
            nv = _n_vocab(model)
            out = np.stack([_logits(ctx, i, nv) for i in range(len(TOKENS))])
    finally:
        L.llama_model_free(model)
    return out, lines


def _overridden(lines: list[str]) -> set[str]:
    return {m.group(1) for l in lines if (m := re.search(r"tensor (\S+) \(.*buffer type overridden to", l))}


@pytest.mark.parametrize("ftype", ["F32", "Q4_K"])  # Q4_K: llama.cpp still repacks the overridden CPU tensors
def test_n_cpu_moe_overrides_load_and_match_the_cpu_run(ftype):
    path = tiny_gguf("qwen3moe", ftype)
    plain, _ = _logits_of(path)
    cpu_layers = H.cpu_layers_for("n-cpu-moe=1", [0, 1], 0, 8)
    assert cpu_layers == [0]
    ov = H.Overrides(H.cpu_layer_patterns(cpu_layers))
    assert ov.array[1].pattern is None  # NULL-terminated
    got, log = _logits_of(path, ngl=H.ALL_LAYERS_NGL, overrides=ov)
    assert _overridden(log) == {f"blk.0.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}
    np.testing.assert_array_equal(got, plain)  # the same kernels on the same bytes: bit-identical
    both, log = _logits_of(path, ngl=H.ALL_LAYERS_NGL, overrides=H.Overrides(H.cpu_layer_patterns([0, 1])))
    assert len(_overridden(log)) == 6
    np.testing.assert_array_equal(both, plain)


def test_same_expert_bytes_on_the_device():
    moe = [1, 2, 3, 4]  # a leading dense layer (DeepSeek, GLM): llama.cpp's layer indices, not MoE positions
    assert H.cpu_layers_for("llama-cpp", moe, 0, 64) == moe
    assert H.cpu_layers_for("n-cpu-moe=2", moe, 0, 64) == [1, 2]
    assert H.cpu_layers_for("n-cpu-moe", moe, 32, 64) == [1, 2]  # half the experts' bytes: half the layers
    assert H.cpu_layers_for("hybrimoe", moe, 16, 64) == [1, 2, 3]  # 16 of 64 per layer = one whole layer
    assert H.cpu_layers_for("lru", moe, 64, 64) == []
    assert H.cpu_layers_for("lru", moe, 0, 64) == moe
    assert H.flags([], 4) == "-ngl 99"
    assert H.flags(moe, 4) == "-ngl 99 --cpu-moe"
    assert H.flags([0, 1], 4) == "-ngl 99 --n-cpu-moe 2"
    assert H.flags([1, 2], 4) == r'-ngl 99 -ot "blk\.(1|2)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"'


def test_bench_worker_runs_llama_cpps_hybrid_with_the_overrides():
    """The llama.cpp worker of `bench` with -ngl 99 and the CPU layers' overrides (what a CUDA build gets)."""
    spec = R.BenchSpec(model=str(tiny_gguf("qwen3moe", "Q8_0")), n_prompt=[8], n_gen=[2], reps=1, threads=1,
                       llama_ngl=H.ALL_LAYERS_NGL, llama_cpu_layers=[0], llama_flags="-ngl 99 --n-cpu-moe 1")
    out = R.bench_llama_cpp(spec, timeout=120)
    assert out["engine"] == "llama.cpp -ngl 99 --n-cpu-moe 1"
    assert out["settings"]["n_gpu_layers"] == 99 and out["settings"]["cpu_moe_layers"] == [0]
    assert all(r["tps"] > 0 for r in out["results"])


def test_cpu_only_build_says_so_in_one_line():
    said = []
    spec = R.BenchSpec(model=str(tiny_gguf("qwen3moe", "Q8_0")))
    if R.llama_cpp_has_gpu():
        pytest.skip("this llama-cpp-python has a GPU backend")
    out = R.llama_cpp_specs(spec, "cuda", ["hybrimoe", "lru"], 4, said.append)
    assert out == [(spec, ["hybrimoe", "lru"])] and len(said) == 1 and "CPU-only" in said[0]
    assert R.llama_cpp_specs(spec, "cpu", ["lru"], 4, said.append) == [(spec, ["lru"])] and len(said) == 1


def test_one_llama_run_per_distinct_cpu_layer_set():
    said = []
    spec = R.BenchSpec(model=str(tiny_gguf("qwen3moe", "Q8_0")))  # 2 MoE layers of 8 experts
    out = R.llama_hybrid_specs(spec, ["hybrimoe", "lru", "llama-cpp", "n-cpu-moe=0"], 4, said.append)
    assert [(s.llama_cpu_layers, ps) for s, ps in out] == [([0], ["hybrimoe", "lru"]), ([0, 1], ["llama-cpp"]),
                                                           ([], ["n-cpu-moe=0"])]
    assert all(s.llama_ngl == 99 for s, _ in out) and len(said) == 3
    assert said[0] == "llama.cpp for hybrimoe, lru: -ngl 99 --n-cpu-moe 1 (the same expert bytes on the device)"
