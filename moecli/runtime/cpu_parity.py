"""CPU experts in hybrid mode vs CPU-only mode, per MoE layer in decode (issue #13 item 4: within 10 %).

    python3 -m moecli.runtime.cpu_parity MODEL N_GEN ROUNDS [THREADS]

Each round decodes N_GEN tokens in hybrid mode with every expert on the CPU (`--placement llama-cpp` on the CPU
device) and in CPU-only mode (the ggml engine), timing each CPU experts' ggml call where it runs, between the dense
work of the layers around it. CPU-only mode runs its experts inside its one-graph forward, where they cannot be
timed apart, so its side decodes through the ggml engine's layer-by-layer path (the same CpuExperts, repacked
weights, threads and quantized dense matmuls between). Also printed: the hybrid's calls replayed back to back
("alone": caches warm, nothing between). Per round and as medians: ms per MoE layer and the ratio.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np


def decode_round(model, prompt: list[int], n_gen: int) -> tuple[list, float]:
    """Decode n_gen tokens; the CPU experts' decode calls as logged (layer, x, tok, ids, w, s) and tok/s."""
    tr = model.transformer
    eng = getattr(tr.experts, "cpu", tr.experts).engine  # hybrid: the executor's CPU side
    cache = tr.new_cache(len(prompt) + n_gen + 1)
    tr.forward(prompt, cache, all_logits=False)
    list(model.generate(prompt, max_tokens=2, stop_at_eog=False))  # warm-up: pages, graphs
    cache.pos = len(prompt)
    eng.log = []
    t0 = time.perf_counter()
    tok = prompt[-1]
    for _ in range(n_gen):
        tok = int(tr.forward([tok], cache, all_logits=False)[-1].argmax())
    dt = time.perf_counter() - t0
    calls, eng.log = eng.log, None
    return calls, n_gen / dt


def replay(engine, calls: list) -> list[float]:
    """The same calls through another CpuExperts, timed one by one (seconds)."""
    for layer, x, tok, ids, w, _ in calls[: len(engine.layers)]:  # warm-up: pages, graphs
        engine.run(layer, x, tok, ids, w)
    out = []
    for layer, x, tok, ids, w, _ in calls:
        t0 = time.perf_counter()
        engine.run(layer, x, tok, ids, w)
        out.append(time.perf_counter() - t0)
    return out


def measure(path: str, n_gen: int, rounds: int, threads: int | None = None, say=print) -> dict:
    import moecli

    hy = moecli.load(path, placement="llama-cpp", expert_slots=0, threads=threads)
    cpu = moecli.load(path, threads=threads)  # CPU-only mode: the ggml engine (one threadpool for both)
    cpu.transformer.fused_forward = None  # its layer-by-layer path: the experts' calls timed where they run
    from moecli.kernels import ggml

    c = hy.config
    prompt = list(np.random.default_rng(0).integers(1, c.n_vocab, 8))
    h_ms, c_ms, a_ms = [], [], []
    for r in range(rounds):
        calls, tps = decode_round(hy, prompt, n_gen)
        c_calls, c_tps = decode_round(cpu, prompt, n_gen)
        h = 1e3 * statistics.mean(s for *_, s in calls)
        c_ = 1e3 * statistics.mean(s for *_, s in c_calls)
        a = 1e3 * statistics.mean(replay(cpu.transformer.experts.engine, calls))
        h_ms.append(h)
        c_ms.append(c_)
        a_ms.append(a)
        say(f"round {r + 1}: hybrid {h:.3f} ms per MoE layer ({len(calls)} calls, {tps:.1f} tok/s), CPU-only "
            f"{c_:.3f} ms ({len(c_calls)} calls, {c_tps:.1f} tok/s), ratio {h / c_:.3f}; alone {a:.3f} ms")
    h, c_, a = statistics.median(h_ms), statistics.median(c_ms), statistics.median(a_ms)
    say(f"median over {rounds} rounds: CPU experts {h:.3f} ms per MoE layer in hybrid (llama-cpp placement, CPU "
        f"device) vs {c_:.3f} ms in CPU-only mode: ratio {h / c_:.3f} ({ggml.n_threads()} ggml threads; the "
        f"hybrid's calls alone: {a:.3f} ms)")
    return {"hybrid_ms": h, "cpu_only_ms": c_, "ratio": h / c_, "alone_ms": a, "threads": ggml.n_threads()}


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python3 -m moecli.runtime.cpu_parity MODEL N_GEN ROUNDS [THREADS]", file=sys.stderr)
        return 2
    from moecli.errors import MoecliError

    try:
        measure(argv[0], int(argv[1]), int(argv[2]), int(argv[3]) if len(argv) == 4 else None)
    except (MoecliError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
