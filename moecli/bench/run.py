"""Real benchmarks, llama-bench style: moecli and (optionally) llama.cpp on the same GGUF, same token counts.

Tests (as llama-bench names them): `pp{P}` = one forward of P random tokens into an empty cache; `tg{N}` = N
single-token decode steps after a 1-token prompt; `pp{P} @ d{D}` / `tg{N} @ d{D}` = the same with D tokens already
in the KV cache. Each test runs one untimed warm-up then `reps` timed repetitions; tokens/s mean ± std over them.
Token ids are random (fixed seed) and identical on both sides.

Each side runs in its own fresh subprocess (`python -m moecli.bench.run WORKER SPEC_JSON`), so peak RSS
(`ru_maxrss`) is that engine's alone and the two thread pools never coexist.

moecli side: the experts seam (`Transformer.experts`) is wrapped in a timer, so the report also gives the expert
kernel's effective bandwidth in decode (bytes of the distinct experts each call reads / time in the seam) and its
GFLOP/s in prefill (2 · 3 · d · ff · pairs / time). Each test also reports the GFLOP/s the whole pass achieved
(`pass_flops`: the same work on both sides, so llama.cpp's too) and, for prompts on the ggml engine, the kernels'
bound: the t/s if nothing but the matmuls took time, each at the rate ggml gives it alone (experts at the probed
expert kernel's, every dense weight at that of a prompt-shaped matmul on its type and shape). No engine built on
these kernels should pass it.

llama.cpp side: llama-cpp-python's low-level API, CPU only (n_gpu_layers 0), mmap on, n_batch = n_ubatch = 512,
n_threads = n_threads_batch = the same count, default KV type (F16), default flash-attention (auto; off with
--no-flash-attn, as moecli's then) and default CPU weight repacking; logits for the last token of each batch only
(as llama-bench).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moecli.chat.stats import snapshot
from moecli.errors import MoecliError
from moecli.models.layers import restore_state, save_state

SEED = 1234
_MARK = "@@MOECLI_BENCH@@"
_ROW = "@@MOECLI_BENCH_ROW@@"      # one test finished: its result, for the table's row as llama-bench prints it
_EVENT = "@@MOECLI_BENCH_EVENT@@"  # a test (and repetition) started: for the progress line


@dataclass
class BenchSpec:
    model: str
    n_prompt: list[int] = field(default_factory=lambda: [512])  # llama-bench's -p list (an int is one entry)
    n_gen: list[int] = field(default_factory=lambda: [128])
    depths: list[int] = field(default_factory=lambda: [0])
    reps: int = 5
    threads: int | None = None
    engine: str = "ggml"  # ggml / torch / hybrid (placement)
    placement: str | None = None
    device: str = "cpu"  # the hybrid path's device (placements), and llama.cpp's GPU offload when it has one
    expert_slots: int = 0  # device expert slots per layer (placements)
    llama_ngl: int = 0  # llama.cpp's -ngl (its GPU offload; 0 without a CUDA build)
    llama_cpu_layers: list[int] | None = None  # with -ngl: layers whose experts llama.cpp keeps on the CPU (-ot)
    llama_flags: str = ""  # the llama.cpp flags that configuration equals (its engine label in the report)
    seed: int = SEED
    flash_attn: bool = True  # False: both sides take llama.cpp's non-flash attention
    exact: bool = False  # moecli in exact mode; llama.cpp with the settings its logits match (F32 KV, no flash)

    def __post_init__(self):
        self.n_prompt = [self.n_prompt] if isinstance(self.n_prompt, int) else list(self.n_prompt)
        self.n_gen = [self.n_gen] if isinstance(self.n_gen, int) else list(self.n_gen)

    def tests(self) -> list[tuple[str, int, int]]:
        """(kind, count, depth) in run order: at each depth every prompt size, then every decode length."""
        out = []
        for d in self.depths:
            out += [("pp", p, d) for p in self.n_prompt if p]
            out += [("tg", n, d) for n in self.n_gen if n]
        return out

    @property
    def max_prompt(self) -> int:
        return max(self.n_prompt, default=0)

    @property
    def n_ctx(self) -> int:
        return max(self.depths) + max(self.max_prompt, max(self.n_gen, default=0) + 1)


def _emit(mark: str, obj: dict) -> None:
    """A line the parent reads while the worker runs (stdout is a pipe: flush each one)."""
    sys.stdout.write(mark + json.dumps(obj) + "\n")
    sys.stdout.flush()


def test_name(kind: str, n: int, depth: int) -> str:
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


def _stats(times: list[float], n_tokens: int, cpus: list[float] = ()) -> dict:
    """t/s from wall times; `cpus`: the process's CPU time per repetition (`cpu_ms`: what a busy host's other jobs
    do not add to, unlike wall time; with one thread, the compute itself)."""
    tps = [n_tokens / t for t in times]
    out = dict(tps=statistics.fmean(tps), tps_std=statistics.stdev(tps) if len(tps) > 1 else 0.0,
               ms=statistics.fmean(times) * 1e3, samples_ms=[t * 1e3 for t in times])
    if cpus:
        out.update(cpu_ms=statistics.fmean(cpus) * 1e3, cpu_samples_ms=[c * 1e3 for c in cpus])
    return out


def _tokens(seed: int, n_vocab: int, n: int, salt: int) -> list[int]:
    import numpy as np

    return np.random.default_rng([seed, salt]).integers(0, n_vocab, n).tolist()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_now() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return 0


# ---------------------------------------------------------------------------------------------------------------
# moecli worker


class _TimedExperts:
    """Wraps the experts seam: accumulates time, calls, (token, expert) pairs and bytes of distinct experts read."""

    def __init__(self, inner, expert_bytes: dict[int, int], sync=None):
        self.inner, self.expert_bytes, self.sync = inner, expert_bytes, sync
        self.reset()

    def reset(self):
        self.seconds, self.calls, self.pairs, self.bytes = 0.0, 0, 0, 0

    def __getattr__(self, name):  # stats, attach, recorder... of the wrapped executor
        return getattr(self.inner, name)

    def __call__(self, layer, hidden, ids, weights, scores=None):
        t0 = time.perf_counter()
        out = self.inner(layer, hidden, ids, weights, scores)
        if self.sync is not None:
            self.sync()
        self.seconds += time.perf_counter() - t0
        n, k = ids.shape
        self.calls += 1
        self.pairs += n * k
        distinct = k if n == 1 else int(ids.unique().numel())  # top-k ids of one token are distinct
        self.bytes += distinct * self.expert_bytes.get(layer, 0)
        return out


def _expert_bytes(ckpt) -> dict[int, int]:
    out = {}
    for l in range(ckpt.config.n_layer):
        total = 0
        for p in ("gate", "up", "down"):
            s = ckpt.experts.get(f"blk.{l}.ffn_{p}_exps")
            if s is None:
                break
            if s.stacked is not None:
                total += s.stacked.raw.nbytes // s.stacked.ne[2]
            else:
                total += s.expert(0).raw.nbytes
        else:
            out[l] = total
    return out


def run_moecli(spec: BenchSpec) -> dict:
    """In-process moecli benchmark (call it in a fresh process: see `bench_moecli`)."""
    import torch

    import moecli

    rss_before = _rss_now()
    opts = dict(n_ctx=spec.n_ctx, threads=spec.threads, flash_attn=spec.flash_attn)
    if spec.exact:
        opts["exact"] = True
    if spec.placement:
        opts.update(placement=spec.placement, device=spec.device, expert_slots=spec.expert_slots)
    else:
        opts["engine"] = spec.engine
    t0 = time.perf_counter()
    m = moecli.load(spec.model, **opts)
    load_s = time.perf_counter() - t0
    from moecli.kernels import ggml

    threads = ggml.n_threads() if m.engine in ("ggml", "hybrid") else torch.get_num_threads()
    if m.engine == "torch" and spec.threads:
        torch.set_num_threads(spec.threads)
        threads = spec.threads
    engine = (m.engine if not spec.placement else f"hybrid:{spec.placement}") + (" --exact" if spec.exact else "")
    info = _model_info(m)
    _emit(_EVENT, {"loaded": dict(engine=engine, threads=threads, model_info=info,
                                  file_bytes=int(m.checkpoint.file_bytes))})
    tr = m.transformer
    c = m.config
    timer = None
    if c.is_moe and tr.experts is not None:
        sync = torch.cuda.synchronize if m.device.type == "cuda" else None
        timer = _TimedExperts(tr.experts, _expert_bytes(m.checkpoint), sync)
        tr.experts = timer
    cache = tr.new_cache(spec.n_ctx)
    # Global warm-up (as llama-bench: one prompt batch and one decode step) so the first test pays no page faults.
    warm = _tokens(spec.seed, c.n_vocab, max(spec.max_prompt, 2), 0)
    tr.forward(warm[:-1], cache, all_logits=False)
    tr.forward(warm[-1:], cache, all_logits=False)
    results = []
    for kind, n, depth in spec.tests():
        cache.pos = 0
        if depth:
            tr.forward(_tokens(spec.seed, c.n_vocab, depth, 1), cache, all_logits=False)
        at_depth = save_state(cache)  # a recurrent state cannot rewind: each repetition starts from this copy
        times, cpus, exp_s, exp_b, exp_p, routes = [], [], 0.0, 0, 0, {}
        placed = None
        cpu_engine = getattr(getattr(tr.experts, "cpu", None), "engine", None) if spec.placement else None
        cpu_calls = []
        for rep in range(spec.reps + 1):  # rep 0: warm-up
            _emit(_EVENT, {"test": test_name(kind, n, depth), "rep": rep, "reps": spec.reps})
            if rep == 1:
                placed = hybrid_snapshot(m)  # the expert counters of the timed repetitions only
            cache.pos = depth
            if depth:
                restore_state(cache, at_depth)
            toks = _tokens(spec.seed, c.n_vocab, n if kind == "pp" else n + 1, 100 + rep)
            if kind == "tg":
                tr.forward(toks[:1], cache, all_logits=False)  # the 1-token prompt, untimed
            if timer:
                timer.reset()
            if cpu_engine is not None and kind == "tg" and rep:
                cpu_engine.log = cpu_calls  # the CPU experts' calls of the timed decode, with their times
            if kind == "pp" and rep == 0:  # the prompt's routing, replayed by the kernel probe below
                tr.on_router = lambda l, probs, ids, w: routes.__setitem__(l, ids.reshape(-1).numpy().copy())
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "pp":
                tr.forward(toks, cache, all_logits=False)
                tr.on_router = None
            else:
                for t in toks[1:]:
                    tr.forward([t], cache, all_logits=False)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if cpu_engine is not None:
                cpu_engine.log = None
            if rep:
                times.append(dt)
                cpus.append(cpu)
                if timer:
                    exp_s += timer.seconds
                    exp_b += timer.bytes
                    exp_p += timer.pairs
        r = dict(test=test_name(kind, n, depth), kind=kind, n=n, depth=depth, **_stats(times, n, cpus), routes=routes)
        if timer and exp_s > 0:
            r["experts_ms"] = exp_s / len(times) * 1e3
            r["experts_share"] = exp_s / sum(times)
            r["experts_gbs"] = exp_b / exp_s / 1e9
            r["experts_gflops"] = 2 * 3 * c.n_embd * c.n_ff_exp * exp_p / exp_s / 1e9
        r.update(placement_figures(placed, hybrid_snapshot(m), n * len(times)))
        if cpu_calls:
            r.update(cpu_parity_figures(cpu_engine, cpu_calls))
        results.append(r)
        _emit(_ROW, {k: v for k, v in r.items() if k != "routes"})
    peak_rss = _peak_rss()  # before the kernel probe below, which allocates prompt-sized buffers of its own
    if timer:
        tr.experts = timer.inner
        if timer.calls == 0 and getattr(tr, "fused_forward", None) is not None:
            _probe_expert_kernel(m, results, _expert_bytes(m.checkpoint))
    for r in results:
        del r["routes"]
        r["gflop"] = pass_flops(m.checkpoint, r["kind"], r["n"], r["depth"]) / 1e9
        r["gflops"] = r["gflop"] / (r["n"] / r["tps"])
    if m.engine == "ggml":
        _kernel_bound(m, results)
    return dict(
        engine=engine, threads=threads, load_s=load_s,
        results=results, peak_rss_bytes=peak_rss, rss_before_load_bytes=rss_before,
        file_bytes=int(m.checkpoint.file_bytes), kv_bytes=int(cache.nbytes), n_ctx=spec.n_ctx,
        model_info=info,
    )


def cpu_parity_figures(engine, calls: list) -> dict:
    """The CPU experts' ms per MoE layer as the hybrid executor ran them, and the same calls run again alone
    through the same (repacked) kernels, as CPU-only mode runs them (issue #13: within 10 %)."""
    from moecli.runtime.cpu_parity import replay

    alone = replay(engine, calls)
    return {"cpu_experts_ms": 1e3 * sum(c[-1] for c in calls) / len(calls),
            "cpu_only_experts_ms": 1e3 * sum(alone) / len(alone)}


def hybrid_snapshot(m) -> dict | None:
    """The hybrid executor's cumulative counters and per-layer sums now (None for other engines)."""
    st = m.stats
    if st is None or not hasattr(st, "layer_ms"):
        return snapshot(m)
    d = st.as_dict()
    d.update(layer_ms=sum(st.layer_ms.values()), predicted_ms=sum(st.predicted_ms.values()),
             layer_calls=st.calls * len(m.transformer.experts.layers))
    return d


def placement_figures(before: dict | None, after: dict | None, tokens: int = 0) -> dict:
    """Between two counter snapshots (hybrid only): expert-cache hit rate, CPU share of the experts run, and with the
    executor's counters ms per MoE layer (experts call), the cost model's error on it, host<->device syncs and device
    launches per token, decision-core ms per layer."""
    if not before or not after:
        return {}
    d = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))
         and isinstance(before.get(k, 0), (int, float))}
    ran = d.get("cpu_experts", 0) + d.get("device_experts", 0)
    out = {}
    if d.get("active", 0) > 0:
        out["hit_rate"] = d.get("hits", 0) / d["active"]
    if ran > 0:
        out["cpu_share"] = d.get("cpu_experts", 0) / ran
    calls = d.get("layer_calls", 0)
    if calls > 0:
        out["layer_ms"] = d["layer_ms"] / calls
        out["decision_ms_per_layer"] = (d.get("decision_ms", 0.0) + d.get("prefetch_ms", 0.0)) / calls
        if d["layer_ms"] > 0:
            out["cost_model_error"] = d["predicted_ms"] / d["layer_ms"] - 1.0
    if tokens > 0 and "syncs" in d:
        out["syncs_per_token"] = d["syncs"] / tokens
        out["launches_per_token"] = d["launches"] / tokens
    return out


def _probe_expert_kernel(m, results: list[dict], expert_bytes: dict[int, int]) -> None:
    """The one-graph forward runs the experts inside its graph, so their time is not separable there: measure the
    same kernel (CpuExperts on the same weights, choosing its kernel as in the pass) on its own: GB/s of decode-shaped
    calls (1 token, random top-k distinct experts) and GFLOP/s of prompt-shaped ones (the routing the test's prompt
    took: how many tokens each expert gets decides the kernel's speed), per test of that kind."""
    import numpy as np

    c, engine = m.config, m.transformer.experts.engine
    rng = np.random.default_rng(SEED)
    k, E, d = c.n_expert_used, c.n_expert, c.n_embd
    for r in results:
        if r["depth"]:
            continue
        n = 1 if r["kind"] == "tg" else r["n"]
        calls = 32 if n == 1 else 1
        x = rng.standard_normal((n, d), dtype=np.float32)
        tok = np.repeat(np.arange(n, dtype=np.int32), k)
        w = np.full(n * k, 1.0 / k, dtype=np.float32)
        seen = r["routes"]
        routes = [[seen[l].astype(np.int32)] if n > 1 and len(seen.get(l, ())) == n * k else
                  [np.concatenate([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32)
                   for _ in range(calls)] for l in engine.layers]
        for (l, _), ids in zip(engine.layers.items(), routes):  # warm-up: graphs, pages
            engine.run(l, x, tok, ids[0], w)
        t0 = time.perf_counter()
        for (l, _), ids in zip(engine.layers.items(), routes):
            for i in ids:
                engine.run(l, x, tok, i, w)
        dt = time.perf_counter() - t0
        n_calls = calls * len(engine.layers)
        r["experts_ms"], r["experts_share"], r["experts_source"] = dt / n_calls * 1e3, None, "kernel probe"
        r["experts_gbs"] = sum(k * expert_bytes.get(l, 0) * calls for l in engine.layers) / dt / 1e9
        r["experts_gflops"] = 2 * 3 * d * c.n_ff_exp * n * k * n_calls / dt / 1e9


def pass_flops(ckpt, kind: str, n: int, depth: int) -> int:
    """Multiply-add FLOPs (×2) of one test's forward passes: every weight matmul (experts at top-k of n_expert),
    causal attention (q·k and p·v over the keys each token sees), the output head on the last token of a prompt
    and on every decoded token. As in llama.cpp (out_ids), a prompt's last layer runs its FFN for the last token
    only. Norms, RoPE and softmax are left out (a few %)."""
    c = ckpt.config
    last_ffn = f"blk.{c.n_layer - 1}.ffn_"
    rows = n if kind == "tg" else 1  # tokens through the output head and the last layer's FFN

    def tokens(name):
        return rows if name.startswith(last_ffn) else n

    weights, head = 0, 0
    for name, t in ckpt.tensors.items():
        if len(t.ne) < 2 or "_exps" in name or name.startswith("token_embd"):
            continue
        if name.startswith("output."):
            head = t.n_elements
        else:
            weights += t.n_elements * tokens(name)
    if not head:  # tied embeddings
        head = ckpt.tensors["token_embd.weight"].n_elements
    # keys seen: positions depth..depth+n-1 for a prompt; depth+1..depth+n after tg's 1-token prompt
    first = depth + 1 if kind == "pp" else depth + 2
    keys = n * first + n * (n - 1) // 2
    attn = 2 * c.n_layer * c.n_head * (c.head_dim + (c.v_head_dim or c.head_dim)) * keys
    return 2 * weights + expert_flops(ckpt, kind, n) + attn + 2 * head * rows


def expert_flops(ckpt, kind: str, n: int) -> int:
    """The routed experts' share of `pass_flops` (a prompt's last layer: its last token only)."""
    c = ckpt.config
    last = f"blk.{c.n_layer - 1}."
    return 2 * sum(s.ne[0] * s.ne[1] * c.n_expert_used * (1 if kind == "pp" and key.startswith(last) else n)
                   for key, s in ckpt.experts.items())


def _kernel_bound(m, results: list[dict]) -> None:
    """For each prompt test: the t/s this pass would reach if nothing but its matmuls took time, each at the rate
    ggml gives it on its own: the experts at the expert kernel's probed GFLOP/s, every dense weight at the rate
    of one prompt-shaped ggml matmul on a weight of its type and shape (probed here), attention and the rest at
    the best of those. The ceiling the ggml kernels themselves put on prefill, whatever the engine around them.
    Only where the probe runs the pass's own expert kernel: prompts whose experts run outside the graph (split
    mode: CpuExperts' loop), or no experts. The graph's mul_mat_id broadcasts each token's row over its k experts,
    which the probe's call (a row per pair) does not reproduce."""
    import numpy as np

    from moecli.kernels import ggml
    from moecli.runtime.ggml_forward import UBATCH

    ckpt = m.checkpoint
    groups: dict[tuple, list] = {}  # (type, ne) -> the dense weights of that kind
    for name, t in ckpt.tensors.items():
        if name.startswith("blk.") and len(t.ne) == 2 and "_exps" not in name and name.endswith(".weight"):
            groups.setdefault((t.type, t.ne), []).append(t)
    fused = getattr(m.transformer, "fused_forward", None)
    for r in results:
        if r["kind"] != "pp" or not groups:
            continue
        if m.config.is_moe and (fused is None or not fused._split(min(r["n"], UBATCH))):
            continue
        n, seconds, gflop, best = r["n"], 0.0, 0.0, 0.0
        for ws in groups.values():
            w = ws[0]
            x = np.random.default_rng(SEED).standard_normal((n, w.ne[0]), dtype=np.float32)
            ggml.matmul(w, x, repacked=False)  # warm-up
            t0, reps = time.perf_counter(), 3
            for _ in range(reps):
                ggml.matmul(w, x, repacked=False)
            dt = (time.perf_counter() - t0) / reps
            best = max(best, 2 * n * w.n_elements / dt / 1e9)
            last = [t for t in ws if t.name.startswith(f"blk.{m.config.n_layer - 1}.ffn_")]  # 1 token there
            seconds += dt * (len(ws) - len(last))
            gflop += 2 * n * w.n_elements * (len(ws) - len(last)) / 1e9
        expert_gflop = expert_flops(ckpt, "pp", n) / 1e9
        if expert_gflop and not r.get("experts_gflops"):
            continue
        r["dense_gflops"] = best
        rest = max(0.0, r["gflop"] - expert_gflop - gflop)  # attention, the output head: at the best rate
        seconds += rest / best + (expert_gflop / r["experts_gflops"] if expert_gflop else 0.0)
        r["kernel_bound_tps"] = n / seconds


def _model_info(m) -> dict:
    from moecli.models.layers import dense_bytes

    c = m.config
    params = 0
    for t in m.checkpoint.tensors.values():
        params += int(t.n_elements)
    for s in m.checkpoint.experts.values():
        if s.stacked is None:
            params += sum(int(e.n_elements) for e in s.experts)
    dense_dev, dense_file = dense_bytes(m.transformer)  # (0, 0) on the ggml engine: nothing on a device
    return dict(name=Path(m.path).name, arch=c.arch, n_layer=c.n_layer, n_embd=c.n_embd, n_vocab=c.n_vocab,
                n_expert=c.n_expert, n_expert_used=c.n_expert_used, n_ff_exp=c.n_ff_exp, params=params,
                types=_type_mix(m.checkpoint), dense_device_bytes=dense_dev, dense_file_bytes=dense_file)


def _type_mix(ckpt) -> str:
    """Most common tensor types by bytes, e.g. 'Q4_K 71% Q6_K 20% ...'."""
    by = {}
    for t in ckpt.tensors.values():
        by[t.type.name] = by.get(t.type.name, 0) + int(t.raw.nbytes)
    tot = sum(by.values()) or 1
    return " ".join(f"{k} {v * 100 // tot}%" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:3])


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp worker


def run_llama_cpp(spec: BenchSpec) -> dict:
    """In-process llama.cpp benchmark through llama-cpp-python's low-level API (call it in a fresh process)."""
    import llama_cpp as L

    from moecli.kernels.llama_log import quiet_llama

    quiet_llama()
    L.llama_backend_init()
    threads = spec.threads
    if not threads:
        from moecli.kernels.ggml import physical_cores

        threads = physical_cores()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = spec.llama_ngl
    overrides = None
    if spec.llama_cpu_layers:  # --n-cpu-moe / -ot: these layers' experts on the CPU, the rest where -ngl puts it
        from moecli.bench.llama_hybrid import Overrides, cpu_layer_patterns

        overrides = Overrides(cpu_layer_patterns(spec.llama_cpu_layers))
        overrides.apply(mp)
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(str(spec.model).encode(), mp)
    if not model:
        raise MoecliError(f"llama.cpp could not load {spec.model} (set MOECLI_LLAMA_LOG=1 to see why)")
    load_s = time.perf_counter() - t0
    engine = f"llama.cpp {spec.llama_flags}" if spec.llama_flags else "llama.cpp"
    if spec.exact:
        engine += " -fa off -ctk f32 -ctv f32"
    _emit(_EVENT, {"loaded": dict(engine=engine, threads=threads, file_bytes=None, model_info=dict(
        name=Path(spec.model).name, params=int(L.llama_model_n_params(model))))})
    cp = L.llama_context_default_params()
    n_batch = max(512, spec.max_prompt)
    cp.n_ctx, cp.n_batch, cp.n_ubatch = spec.n_ctx, n_batch, min(n_batch, 512)
    cp.n_threads = cp.n_threads_batch = threads
    if not spec.flash_attn or spec.exact:
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if spec.exact:  # the KV cache moecli keeps (and exact comparisons use)
        cp.type_k = cp.type_v = L.GGML_TYPE_F32
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise MoecliError("llama.cpp could not create a context")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(n_batch, 0, 1)

    def decode(tokens: list[int], pos0: int) -> None:
        for s in range(0, len(tokens), n_batch):
            chunk = tokens[s:s + n_batch]
            batch.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                batch.token[i] = t
                batch.pos[i] = pos0 + s + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(chunk) - 1
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise MoecliError(f"llama_decode failed ({rc})")
        L.llama_synchronize(ctx)

    warm = _tokens(spec.seed, n_vocab, max(spec.max_prompt, 2), 0)
    decode(warm[:-1], 0)
    decode(warm[-1:], len(warm) - 1)
    results = []
    for kind, n, depth in spec.tests():
        L.llama_memory_clear(mem, True)
        if depth:
            decode(_tokens(spec.seed, n_vocab, depth, 1), 0)
        times, cpus = [], []
        for rep in range(spec.reps + 1):
            _emit(_EVENT, {"test": test_name(kind, n, depth), "rep": rep, "reps": spec.reps})
            L.llama_memory_seq_rm(mem, 0, depth, -1)
            toks = _tokens(spec.seed, n_vocab, n if kind == "pp" else n + 1, 100 + rep)
            if kind == "tg":
                decode(toks[:1], depth)
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "pp":
                decode(toks, depth)
            else:
                for i, t in enumerate(toks[1:]):
                    decode([t], depth + 1 + i)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if rep:
                times.append(dt)
                cpus.append(cpu)
        results.append(dict(test=test_name(kind, n, depth), kind=kind, n=n, depth=depth, **_stats(times, n, cpus)))
        _emit(_ROW, results[-1])
    kv_bytes = L.llama_state_get_size(ctx)  # the KV cache dominates the state of a fresh-ish context
    out = dict(engine=engine, threads=threads, model_info=dict(name=Path(spec.model).name), load_s=load_s, results=results, peak_rss_bytes=_peak_rss(),
               n_ctx=spec.n_ctx, state_bytes=int(kv_bytes), model_size_bytes=int(L.llama_model_size(model)),
               params=int(L.llama_model_n_params(model)),
               settings=dict(n_batch=n_batch, n_ubatch=cp.n_ubatch, type_k="F32" if spec.exact else "default (F16)",
                             flash_attn_type=int(cp.flash_attn_type), use_extra_bufts=bool(mp.use_extra_bufts),
                             use_mmap="default", n_gpu_layers=spec.llama_ngl,
                             cpu_moe_layers=list(spec.llama_cpu_layers or []), llama_cpp_python=L.__version__,
                             gpu_offload=bool(L.llama_supports_gpu_offload())))
    del overrides  # the loader has read the patterns
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


# ---------------------------------------------------------------------------------------------------------------
# subprocess plumbing


def _run_worker(worker: str, spec: BenchSpec, timeout: float | None = None, on_row=None, on_event=None) -> dict:
    """Run one side in a fresh process; `on_row(result)` as each test finishes, `on_event(event)` as each test
    repetition starts; returns the worker's final document."""
    import tempfile
    import threading

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("GGML_NO_BACKTRACE", "1")  # an abort should not start gdb for a backtrace nobody reads
    payload = json.dumps(spec.__dict__)
    out, timed_out = None, threading.Event()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "moecli.bench.run", worker, payload], stdout=subprocess.PIPE,
                             stderr=err, text=True, env=env)
        timer = threading.Timer(timeout, lambda: (timed_out.set(), p.kill())) if timeout else None
        if timer:
            timer.start()
        try:
            for line in p.stdout:
                for mark, call in ((_ROW, on_row), (_EVENT, on_event)):
                    if line.startswith(mark):
                        if call is not None:
                            call(json.loads(line[len(mark):]))
                        break
                else:
                    if line.startswith(_MARK):
                        out = json.loads(line[len(_MARK):])
            p.wait()
        except BaseException:  # Ctrl-C, or a callback failing (a closed pipe): the worker goes too
            p.kill()
            p.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        if timed_out.is_set():
            raise MoecliError(f"the {worker} benchmark did not finish within {timeout:.0f} s")
        if out is not None:
            if "error" in out:
                raise MoecliError(out["error"])
            return out
        err.seek(0)
        raise MoecliError(worker_failure(worker, p.returncode, err.read()))


def worker_failure(worker: str, returncode: int, stderr: str) -> str:
    """One line for a worker that died without its document: ggml's failed assertion where there is one (the last
    stderr line of an abort is often a debugger's), and the signal by name."""
    import signal

    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if "GGML_ASSERT" in ln or "GGML_ABORT" in ln), None)
    if cause is not None:
        cause = cause.split("/ggml/src/")[-1]  # the build directory's path says nothing
    else:
        cause = lines[-1] if lines else "(no output)"
    side = "llama.cpp" if worker == "llama_cpp" else worker
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{side} aborted on this model ({name}): {cause}"
    return f"the {worker} benchmark failed (exit {returncode}): {cause}"


def bench_moecli(spec: BenchSpec, timeout: float | None = None, **callbacks) -> dict:
    return _run_worker("moecli", spec, timeout, **callbacks)


def llama_cpp_has_gpu() -> bool:
    """Whether this llama-cpp-python was built with a GPU backend (a CPU-only wheel says no)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def llama_cpp_specs(spec: BenchSpec, device: str, placements: list[str], expert_slots: int,
                    say) -> list[tuple[BenchSpec, list[str]]]:
    """llama.cpp's side of a comparison, as (its spec, the placements it answers): on a GPU with a CUDA build, its
    own hybrid (-ngl 99, --n-cpu-moe / -ot) with the same expert bytes on the device as each placement (one run per
    distinct set of CPU layers); CPU-only (said in one line) otherwise: one run for all."""
    from dataclasses import replace

    if device == "cpu" or not placements:
        return [(spec, placements)]
    if not llama_cpp_has_gpu():
        say("llama.cpp: this llama-cpp-python has no GPU backend (built without CUDA; ./install.sh builds it with "
            "CUDA when nvidia-smi lists a GPU and nvcc exists): its run is CPU-only (-ngl 0), not its -ngl 99 "
            "--n-cpu-moe hybrid")
        return [(spec, placements)]
    return llama_hybrid_specs(spec, placements, expert_slots, say)


def llama_hybrid_specs(spec: BenchSpec, placements: list[str], expert_slots: int,
                       say) -> list[tuple[BenchSpec, list[str]]]:
    """llama.cpp's -ngl 99 with the CPU layers that give it each placement's expert bytes on the device, one run per
    distinct set of CPU layers, each said in one line."""
    from dataclasses import replace

    from moecli.bench.llama_hybrid import ALL_LAYERS_NGL, cpu_layers_for, flags
    from moecli.models.loader import load_checkpoint

    ckpt = load_checkpoint(Path(spec.model))  # metadata only: the weights stay memory-mapped
    c = ckpt.config
    moe = [l for l in range(c.n_layer) if f"blk.{l}.ffn_gate_exps" in ckpt.experts]
    groups: dict[tuple, list[str]] = {}
    for p in placements:
        groups.setdefault(tuple(cpu_layers_for(p, moe, expert_slots, c.n_expert)), []).append(p)
    out = []
    for layers, ps in groups.items():
        say(f"llama.cpp for {', '.join(ps)}: {flags(list(layers), len(moe))} (the same expert bytes on "
            f"the device)")
        out.append((replace(spec, llama_ngl=ALL_LAYERS_NGL, llama_cpu_layers=list(layers),
                            llama_flags=flags(list(layers), len(moe))), ps))
    return out


def bench_llama_cpp(spec: BenchSpec, timeout: float | None = None, **callbacks) -> dict:
    return _run_worker("llama_cpp", spec, timeout, **callbacks)


def compare(me: dict, ref: dict | None) -> dict:
    """The one-object summary: moecli and llama.cpp t/s per test, their ratios, memory, kernel GB/s and GFLOP/s."""
    def flat(side):
        out = {}
        for r in side["results"]:
            key = r["test"].replace(" @ ", "_at_")
            out[f"{key}_tps"] = r["tps"]
            out[f"{key}_tps_std"] = r["tps_std"]
        return out

    mo = flat(me)
    for r in me["results"]:
        key = r["test"].replace(" @ ", "_at_")
        mo[f"{key}_gflops"] = r["gflops"]
        if "kernel_bound_tps" in r:
            mo[f"{key}_kernel_bound_tps"] = r["kernel_bound_tps"]
        if "experts_gbs" in r:
            mo[f"{key}_experts_ms"] = r["experts_ms"]
            mo[f"{key}_experts_share"] = r["experts_share"]
            if r["kind"] == "tg":
                mo[f"{key}_experts_gbs"] = r["experts_gbs"]
            else:
                mo[f"{key}_experts_gflops"] = r["experts_gflops"]
    out = {"model": me["model_info"], "engine": me["engine"], "threads": me["threads"], "moecli": mo}
    kernel = {}
    for r in me["results"]:
        if "dense_gflops" in r and r["depth"] == 0:
            kernel["dense_prefill_gflops"] = r["dense_gflops"]
        if "experts_gbs" in r and r["depth"] == 0:
            if r["kind"] == "tg":
                kernel["decode_gbs"] = r["experts_gbs"]
            else:
                kernel["prefill_gflops"] = r["experts_gflops"]
    out["kernel"] = kernel
    out["peak_rss_bytes"] = me["peak_rss_bytes"]
    out["rss_before_load_bytes"] = me["rss_before_load_bytes"]
    out["file_bytes"] = me["file_bytes"]
    out["kv_bytes"] = me["kv_bytes"]
    out["rss_ratio"] = me["peak_rss_bytes"] / (me["file_bytes"] + me["kv_bytes"])
    out["rss_ratio_excl_runtime"] = ((me["peak_rss_bytes"] - me["rss_before_load_bytes"])
                                     / (me["file_bytes"] + me["kv_bytes"]))
    if ref is not None:
        lc = flat(ref)
        for r in me["results"]:  # the same passes on the same file: the same FLOPs
            key = r["test"].replace(" @ ", "_at_")
            if lc.get(f"{key}_tps"):
                lc[f"{key}_gflops"] = r["gflop"] * lc[f"{key}_tps"] / r["n"]
        out["llama_cpp"] = lc
        out["llama_cpp"]["peak_rss_bytes"] = ref["peak_rss_bytes"]
        out["llama_cpp"]["settings"] = ref["settings"]
        out["llama_cpp"]["engine"] = ref["engine"]
        out["ratio"] = {}
        for k, v in mo.items():
            if k.endswith("_tps") and lc.get(k):
                out["ratio"][k[:-4]] = v / lc[k]
        # the same ratio from each side's CPU time per pass (llama.cpp's / moecli's): on a shared host other jobs
        # stretch wall time by whatever they happen to run meanwhile, not this; exact for one thread, spin-waits
        # included for more
        cpu = {r["test"]: r["cpu_ms"] for r in ref["results"] if r.get("cpu_ms")}
        out["ratio_cpu"] = {r["test"].replace(" @ ", "_at_"): cpu[r["test"]] / r["cpu_ms"]
                            for r in me["results"] if r.get("cpu_ms") and cpu.get(r["test"])}
    return out


def _worker_main(argv: list[str]) -> None:
    worker, payload = argv
    spec = BenchSpec(**json.loads(payload))
    try:
        out = run_moecli(spec) if worker == "moecli" else run_llama_cpp(spec)
    except MoecliError as e:
        out = {"error": str(e)}
    sys.stdout.write(_MARK + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
