"""Expert-kernel microbenchmark: one Qwen3-30B-A3B-like MoE layer (hidden 2048, expert FFN 768, 128 experts, top-8)
on the CPU through `CpuExperts`, per kernel and token count. Decode is reported in GB/s of expert weights read,
prefill in GFLOP/s.

The 128 experts are copies of one randomly quantized expert (quantizing 600 M values would take minutes); they are
distinct memory, so the bytes streamed per call are those of a real layer.
"""
from __future__ import annotations

import time

import numpy as np
from gguf import GGMLQuantizationType

from moecli.formats.tensor import TensorData
from moecli.kernels import ggml as G
from moecli.runtime.cpu_experts import CpuExperts

T = GGMLQuantizationType


def synthetic_layer(ggml_type, d=2048, ff=768, n_expert=128, seed=0):
    rng = np.random.default_rng(seed)

    def stack(name, rows, cols):
        one = G.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02, ggml_type)
        return TensorData(name, ggml_type, (cols, rows, n_expert), np.tile(one, n_expert))

    return stack("gate", ff, d), stack("up", ff, d), stack("down", d, ff)


def _time(fn, min_time=0.3, min_reps=3):
    fn()  # warm: graph built, pages touched
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_time:
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps


def bench_kernels(types=("Q4_K", "Q8_0"), tokens=(1, 8, 64, 512), kernels=("id", "loop"), top_k=8, threads=None,
                  min_time=0.3, echo=print) -> list[dict]:
    """Print and return one row per (type, kernel, tokens): ms per call, GB/s (weights of the distinct experts
    touched / time) and GFLOP/s; for the cached decode graph also the Python overhead of `run` over the compute."""
    G.set_threads(threads) if threads else G.n_threads()
    rows = []
    echo(f"threads={G.n_threads()}  layer: hidden 2048, expert FFN 768, 128 experts, top-{top_k}")
    echo(f"{'type':6} {'kernel':6} {'tokens':>6} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8} {'py µs':>6}")
    for tname in types:
        gate, up, down = synthetic_layer(T[tname])
        E, d, ff = gate.ne[2], gate.ne[0], gate.ne[1]
        expert_bytes = 3 * gate.expert(0).nbytes
        rng = np.random.default_rng(1)
        for kernel in kernels:
            ce = CpuExperts({0: (gate, up, down)}, kernel=kernel)
            for n in tokens:
                x = rng.standard_normal((n, d), dtype=np.float32)
                ids = np.stack([rng.choice(E, top_k, replace=False) for _ in range(n)]).reshape(-1)
                tok = np.repeat(np.arange(n), top_k)
                w = rng.random(n * top_k, dtype=np.float32)
                dt = _time(lambda: ce.run(0, x, tok, ids, w), min_time)
                overhead = None
                if kernel == "id" and n * top_k <= ce.max_cached_pairs:
                    g = ce._id_graph(0, n * top_k)
                    overhead = (dt - _time(g.compute, min_time)) * 1e6
                gbs = len(np.unique(ids)) * expert_bytes / dt / 1e9
                gflops = 2 * 3 * d * ff * n * top_k / dt / 1e9
                rows.append(dict(type=tname, kernel=kernel, tokens=n, ms=dt * 1e3, gbs=gbs, gflops=gflops,
                                 py_overhead_us=overhead))
                echo(f"{tname:6} {kernel:6} {n:6d} {dt * 1e3:9.3f} {gbs:7.1f} {gflops:8.1f} "
                     f"{'' if overhead is None else f'{overhead:6.0f}'}")
            ce.close()
    return rows


if __name__ == "__main__":
    bench_kernels()
