"""CPU experts in hybrid mode vs CPU-only mode, per MoE layer in decode (issue #13 item 4: within 10 %).

    python3 -m moecli.runtime.cpu_parity MODEL N_GEN ROUNDS

Each round decodes N_GEN tokens in hybrid mode with every expert on the CPU (`--placement llama-cpp` on the CPU
device), timing the CPU experts' ggml call as the executor runs it (on its worker, beside everything else), then runs
the very same calls (the same layers, inputs and routing) through the CPU-only model's experts (the ggml engine's
CpuExperts: its repacked weights, its threads), back to back as its one-graph forward runs them. Printed per round
and as medians: ms per MoE layer of each and their ratio.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np


def hybrid_round(model, prompt: list[int], n_gen: int) -> tuple[list, float]:
    """Decode n_gen tokens; the CPU experts' decode calls as logged (layer, x, tok, ids, w, s) and tok/s."""
    tr = model.transformer
    eng = tr.experts.cpu.engine
    cache = tr.new_cache(len(prompt) + n_gen + 1)
    tr.forward(prompt, cache, all_logits=False)
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


def measure(path: str, n_gen: int, rounds: int, say=print) -> dict:
    import moecli

    hy = moecli.load(path, placement="llama-cpp", expert_slots=0)
    cpu = moecli.load(path)  # CPU-only mode: the ggml engine
    from moecli.kernels import ggml

    c = hy.config
    prompt = list(np.random.default_rng(0).integers(1, c.n_vocab, 8))
    list(hy.generate(prompt, max_tokens=2, stop_at_eog=False))  # warm-up
    h_ms, c_ms = [], []
    for r in range(rounds):
        calls, tps = hybrid_round(hy, prompt, n_gen)
        h = 1e3 * statistics.mean(s for *_, s in calls)
        c_ = 1e3 * statistics.mean(replay(cpu.transformer.experts.engine, calls))
        h_ms.append(h)
        c_ms.append(c_)
        say(f"round {r + 1}: hybrid {h:.3f} ms per MoE layer ({len(calls)} calls, {tps:.1f} tok/s), "
            f"CPU-only {c_:.3f} ms, ratio {h / c_:.3f}")
    h, c_ = statistics.median(h_ms), statistics.median(c_ms)
    say(f"median over {rounds} rounds: CPU experts {h:.3f} ms per MoE layer in hybrid (llama-cpp placement, CPU "
        f"device) vs {c_:.3f} ms in CPU-only mode: ratio {h / c_:.3f} ({ggml.n_threads()} ggml threads)")
    return {"hybrid_ms": h, "cpu_only_ms": c_, "ratio": h / c_, "threads": ggml.n_threads()}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python3 -m moecli.runtime.cpu_parity MODEL N_GEN ROUNDS", file=sys.stderr)
        return 2
    from moecli.errors import MoecliError

    try:
        measure(argv[0], int(argv[1]), int(argv[2]))
    except (MoecliError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
