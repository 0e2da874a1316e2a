"""Kernel microbenchmarks.

`bench_kernels`: one Qwen3-30B-A3B-like MoE layer (hidden 2048, expert FFN 768, 128 experts, top-8) on the CPU
through `CpuExperts`, per kernel and token count. Decode is reported in GB/s of expert weights read, prefill in
GFLOP/s.

`bench_device`: the device kernels (`moecli bench --kernels`): per GGUF type and weight shape (Qwen3-30B-A3B,
gpt-oss-120b, DeepSeek-V3 expert and attention matrices), the Triton kernel reading the quantized bytes against the
torch fallback (dequantize the matrix, then a bf16 matmul, as the device path did before the kernels), decode
(1 token) in GB/s of weight bytes and prefill in TFLOP/s. On a CUDA device that is the measurement; on the CPU it
runs Triton's interpreter on one tiny shape only, to show the command and the kernels work.

The 128 experts are copies of one randomly quantized expert (quantizing 600 M values would take minutes); they are
distinct memory, so the bytes streamed per call are those of a real layer.
"""
from __future__ import annotations

import time
import warnings

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


# (model, matrix, rows, cols): the matrices one token reads, numpy order (out x in)
DEVICE_SHAPES = (
    ("qwen3-30b-a3b", "expert gate/up", 768, 2048), ("qwen3-30b-a3b", "expert down", 2048, 768),
    ("qwen3-30b-a3b", "attn q", 4096, 2048), ("qwen3-30b-a3b", "attn o", 2048, 4096),
    ("gpt-oss-120b", "expert gate/up", 2880, 2880), ("gpt-oss-120b", "attn q", 4096, 2880),
    ("deepseek-v3", "expert gate/up", 2048, 7168), ("deepseek-v3", "expert down", 7168, 2048),
    ("deepseek-v3", "attn q_b", 24576, 1536), ("deepseek-v3", "attn o", 7168, 16384),
)
DEVICE_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q5_0", "F16",
                "BF16")
TINY_SHAPE = (("tiny", "interpreter", 64, 256),)


def _device_time(fn, device, min_time: float) -> float:
    """Seconds per call: triton.testing.do_bench on CUDA (L2 flushed, events), one timed call on the CPU."""
    fn()
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(5, int(min_time * 100)), rep=int(min_time * 1000)) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_device(types=None, tokens=(1, 512), shapes=None, min_time=0.3, echo=print) -> list[dict]:
    """Print and return one row per (type, shape, tokens) for the Triton kernel and the torch fallback."""
    import os

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined (first import below)
    from moecli.kernels import device_ops as D
    from moecli.kernels import torch_dequant

    device = torch.device("cuda" if cuda else "cpu")
    if not D.use_triton(device.type):
        echo("Triton cannot run here: only the torch fallback is measured")
    if not cuda:
        shapes, tokens = shapes or TINY_SHAPE, (1, 32)
        types = types or ("Q4_K", "Q8_0", "MXFP4")
        echo("no CUDA device: Triton's interpreter on one tiny shape (this proves the command, not the speed)")
    shapes, types = shapes or DEVICE_SHAPES, types or DEVICE_TYPES
    echo(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}")
    echo(f"{'type':7} {'model':14} {'matrix':15} {'shape':>11} {'tok':>4} {'triton ms':>10} {'torch ms':>9} "
         f"{'triton':>12} {'torch':>12} {'ratio':>6}")
    rng = np.random.default_rng(0)
    rows = []
    for tname in types:
        ty = T[tname]
        for model, matrix, n, k in shapes:
            nbytes = n * D.row_bytes(ty, k)
            raw = torch.from_numpy(rng.integers(0, 256, nbytes, dtype=np.uint8))  # timing ignores values
            raw = raw.to(device)
            w = D.QuantWeight(raw, ty, (n, k))
            for m in tokens:
                x = torch.randn(m, k, device=device)
                xb = x.to(torch.bfloat16)
                with warnings.catch_warnings():  # random bytes: the interpreter's numpy meets Inf/NaN scales
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t_tr = _device_time(lambda: D.linear(x, w), device, min_time) if D.use_triton(device.type) \
                        else None
                    t_th = _device_time(lambda: xb @ torch_dequant.dequantize(raw, ty, (n, k), torch.bfloat16).T,
                                        device, min_time)
                decode = m <= 16

                def rate(t):
                    if t is None:
                        return "-"
                    return f"{nbytes / t / 1e9:7.2f} GB/s" if decode else f"{2 * m * n * k / t / 1e12:6.2f} TF/s"

                ratio = f"{t_th / t_tr:6.2f}" if t_tr else "     -"
                echo(f"{tname:7} {model:14} {matrix:15} {f'{n}x{k}':>11} {m:4d} "
                     f"{'-' if t_tr is None else f'{t_tr * 1e3:10.3f}':>10} {t_th * 1e3:9.3f} {rate(t_tr):>12} "
                     f"{rate(t_th):>12} {ratio}")
                rows.append(dict(type=tname, model=model, matrix=matrix, n=n, k=k, tokens=m, triton_s=t_tr,
                                 torch_s=t_th, bytes=nbytes))
    return rows


if __name__ == "__main__":
    bench_kernels()
