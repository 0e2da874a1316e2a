"""Measured costs for the cost model (`moecli/policy/cost.py`), taken on the kernels moecli really runs.

CPU: `CpuExperts` (ggml `mul_mat_id` on the quantized bytes in place) on one MoE layer: the model's first MoE layer
when a model is given, else a synthetic Qwen3-30B-A3B-shaped layer (hidden 2048, expert FFN 768, 128 experts) of
random weights quantized by ggml itself. Points:
- one expert with n tokens, n in TOKENS            -> time = first + a·n + b
- m experts with one token each, m in MULTI         -> time = first + m·(a + b)
One least-squares fit over all points gives a (ms per token), b (ms per expert) and the first-expert penalty (ms
once per layer: thread-pool wake-up, graph launch, gather/scatter). Residuals are taken relative to the measured
time, so the 0.3 ms decode points weigh as much as the 20 ms prefill points (an absolute fit would let the 256-token
point decide b). Every call uses another expert (rotating over the layer), so weights come from DRAM as in real
decoding, not from a cache that the previous repetition warmed: a layer holds several times the L3.

Then the fit is checked against what it is for: whole-layer calls with random top-k routing over all experts at a
few token counts, predicted (first + Σ a·n_e + b) vs measured -> "fit error" (issue 5 item 5).

Memory bandwidth: a big numpy copy split over the cores (numpy releases the GIL while copying). CUDA only: device
expert time (the executor's own `DeviceExpertCache.run`: the grouped kernels) vs tokens -> g0 + g1·n; host -> device
bandwidth from pinned and from pageable memory, and the latency of a small copy.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from gguf import GGMLQuantizationType

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData
from moecli.policy.geometry import BITS_PER_WEIGHT

T = GGMLQuantizationType
TOKENS = (1, 2, 4, 8, 16, 64, 256)
MULTI = (1, 2, 4, 8)
ERROR_TOKENS = (3, 12, 32, 128)  # not in TOKENS: a held-out check
SYNTHETIC_SHAPE = ("qwen3-30b-a3b", 2048, 768, 128, 8)  # geometry name, hidden, expert FFN, experts, top-k


# ---------------------------------------------------------------------------------------------------------------
# the layer to measure


@dataclass
class ExpertLayer:
    """One MoE layer's routed experts as 3-D tensors (gate/up ne = (d, ff, E), down ne = (ff, d, E))."""

    label: str        # geometry or model name the measurement stands for ([[cpu.fit]] model = ...)
    quant: str        # name in geometry.BITS_PER_WEIGHT where one fits, else the ggml type names
    gate: TensorData
    up: TensorData
    down: TensorData
    top_k: int
    layer: int = 0

    @property
    def hidden(self) -> int:
        return self.gate.ne[0]

    @property
    def ffn(self) -> int:
        return self.gate.ne[1]

    @property
    def n_expert(self) -> int:
        return self.gate.ne[2]

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in (self.gate, self.up, self.down)) // self.n_expert

    @property
    def expert_flops(self) -> float:
        return 6.0 * self.hidden * self.ffn


def quant_label(gate_type: T, down_type: T) -> str:
    """The cost model's name for an expert's types: the same type for all three -> its name; llama.cpp's Q4_K_M
    recipe (Q4_K gate/up, Q6_K down) -> Q4_K_M (its average bits are in the table); otherwise "GATE/DOWN"."""
    if gate_type == down_type:
        return gate_type.name
    if (gate_type, down_type) == (T.Q4_K, T.Q6_K):
        return "Q4_K_M"
    return f"{gate_type.name}/{down_type.name}"


def synthetic_layer(quant: str, hidden: int = SYNTHETIC_SHAPE[1], ffn: int = SYNTHETIC_SHAPE[2],
                    n_expert: int = SYNTHETIC_SHAPE[3], top_k: int = SYNTHETIC_SHAPE[4], distinct: int = 2,
                    seed: int = 0) -> ExpertLayer:
    """A representative layer: `distinct` experts of random weights quantized with ggml (Q4_K takes ≈0.25 s per
    expert), their bytes tiled to `n_expert` experts at distinct addresses. The kernels' speed does not depend on
    the values, only on the bytes streamed, so tiling keeps the cold-cache behaviour at a fraction of the setup."""
    from moecli.kernels import ggml as G

    try:
        qtype = T[quant.upper()]
    except KeyError:
        raise MoecliError(f"unknown quant type {quant!r}") from None
    rng = np.random.default_rng(seed)
    tensors = []
    for name, rows, cols in (("gate", ffn, hidden), ("up", ffn, hidden), ("down", hidden, ffn)):
        blocks = [G.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02, qtype)
                  for _ in range(min(distinct, n_expert))]
        raw = np.concatenate([blocks[e % len(blocks)] for e in range(n_expert)])
        tensors.append(TensorData(f"synthetic.ffn_{name}_exps", qtype, (cols, rows, n_expert), raw))
    return ExpertLayer(SYNTHETIC_SHAPE[0] if (hidden, ffn) == SYNTHETIC_SHAPE[1:3] else f"synthetic-{hidden}x{ffn}",
                       qtype.name, *tensors, top_k=top_k)


def model_layer(ckpt, label: str) -> ExpertLayer:
    """The first MoE layer of a loaded checkpoint (its own bytes, zero-copy on the mmap)."""
    c = ckpt.config
    for l in range(c.n_layer):
        if f"blk.{l}.ffn_gate_exps" in ckpt.experts:
            stacks = [ckpt.experts[f"blk.{l}.ffn_{p}_exps"] for p in ("gate", "up", "down")]
            if any(s.stacked is None for s in stacks):
                # Per-expert tensors (safetensors): stack one layer's bytes in RAM (a few hundred MB at most).
                ts = []
                for p, s in zip(("gate", "up", "down"), stacks):
                    e0 = s.expert(0)
                    raw = np.concatenate([np.ascontiguousarray(s.expert(e).raw) for e in range(s.n)])
                    ts.append(TensorData(f"blk.{l}.ffn_{p}_exps", e0.type, (*e0.ne[:2], s.n), raw))
            else:
                ts = [s.stacked for s in stacks]
            return ExpertLayer(label, quant_label(ts[0].type, ts[2].type), *ts, top_k=c.n_expert_used, layer=l)
    raise MoecliError("the model has no MoE layer: nothing to profile for experts (dense models run whole on "
                      "one device)")


# ---------------------------------------------------------------------------------------------------------------
# fitting


def least_squares(rows: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Solve rows @ coef ≈ y; `relative` minimises Σ((pred - y) / y)² instead of Σ(pred - y)²."""
    rows, y = np.asarray(rows, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-12) if relative else np.ones_like(y)
    coef, *_ = np.linalg.lstsq(rows * w[:, None], y * w, rcond=None)
    return coef


def fit_linear(n, t, relative: bool = True) -> tuple[float, float]:
    """t ≈ a·n + b by least squares -> (a, b)."""
    n = np.asarray(n, dtype=np.float64)
    a, b = least_squares(np.stack([n, np.ones_like(n)], axis=1), t, relative)
    return float(a), float(b)


def fit_cost(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Points (experts, tokens in all, ms) of one-layer calls -> (a, b, first) with
    ms ≈ first + a·tokens + b·experts. A negative penalty (noise, when it is tiny) is refitted as 0."""
    m = np.array([p[0] for p in points], dtype=np.float64)
    n = np.array([p[1] for p in points], dtype=np.float64)
    t = np.array([p[2] for p in points], dtype=np.float64)
    a, b, first = least_squares(np.stack([n, m, np.ones_like(n)], axis=1), t)
    if first < 0:
        (a, b), first = least_squares(np.stack([n, m], axis=1), t), 0.0
    return float(max(a, 0.0)), float(max(b, 0.0)), float(first)


def fit_pieces(points: list[tuple[float, float, float]], breaks=TOKENS[1:-1]) -> tuple[float, list]:
    """Two lines in tokens per expert, split at the break (tokens per expert) with the lowest relative error, fitted
    jointly over the same points as `fit_cost` (each point goes to the piece of its mean tokens per expert) with one
    shared first-expert penalty -> (first, [(tokens_max, a, b), (inf, a, b)]); (0, []) when a piece lacks points."""
    m = np.array([p[0] for p in points], dtype=np.float64)
    n = np.array([p[1] for p in points], dtype=np.float64)
    t = np.array([p[2] for p in points], dtype=np.float64)
    best, out = float("inf"), (0.0, [])
    for brk in breaks:
        lo = n / m <= brk
        if len(np.unique(n[lo] / m[lo])) < 2 or len(np.unique(n[~lo] / m[~lo])) < 2:
            continue
        rows = np.stack([n * lo, m * lo, n * ~lo, m * ~lo, np.ones_like(n)], axis=1)
        coef = least_squares(rows, t)
        err = float(np.sum((rows @ coef / t - 1) ** 2))
        if err < best and coef[4] >= 0:
            best, out = err, (float(coef[4]), [(float(brk), *map(float, coef[:2])), (float("inf"), *map(float, coef[2:4]))])
    return out


@dataclass
class CpuFit:
    model: str
    quant: str
    threads: int
    a_ms: float
    b_ms: float
    first_ms: float
    expert_bytes: int
    expert_flops: float
    points: list[tuple[int, int, float]] = field(default_factory=list)  # (experts, tokens, ms)
    errors: list[dict] = field(default_factory=list)  # whole-layer checks: tokens, predicted_ms, measured_ms, error
    # Two-piece fit of the one-expert curve [(tokens_max, a, b), (inf, a, b)] (informational: ggml's per-expert
    # time grows ∝ tokens up to a few tokens, then flattens; cost.py's single line cannot follow both).
    pieces: list[tuple[float, float, float]] = field(default_factory=list)
    pieces_first_ms: float = 0.0

    def expert_ms(self, n: int, piecewise: bool = False) -> float:
        if piecewise and self.pieces:
            a, b = next((a, b) for top, a, b in self.pieces if n <= top)
            return a * n + b
        return self.a_ms * n + self.b_ms

    def layer_ms(self, tokens_per_expert, piecewise: bool = False) -> float:
        counts = [int(c) for c in tokens_per_expert if c > 0]
        first = self.pieces_first_ms if piecewise and self.pieces else self.first_ms
        return (first + sum(self.expert_ms(c, piecewise) for c in counts)) if counts else 0.0

    @property
    def fit_error_pct(self) -> float | None:
        """Mean |predicted - measured| / measured over the whole-layer checks, in %."""
        if not self.errors:
            return None
        return 100.0 * float(np.mean([abs(e["error"]) for e in self.errors]))

    @property
    def piecewise_error_pct(self) -> float | None:
        errs = [e["error_piecewise"] for e in self.errors if "error_piecewise" in e]
        return 100.0 * float(np.mean(np.abs(errs))) if errs else None

    @property
    def stream_gbs(self) -> float:
        """Achieved weight-streaming rate implied by b (bytes per expert / ms per expert)."""
        return self.expert_bytes / (self.b_ms * 1e6) if self.b_ms > 0 else 0.0

    @property
    def gflops(self) -> float:
        return self.expert_flops / (self.a_ms * 1e6) if self.a_ms > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# CPU measurements


def _median_ms(fn, reps: int, budget_s: float) -> float:
    """Median wall time of fn(i) over at least `reps` calls (more while under `budget_s`, at most 4·reps), after one
    untimed call that builds graphs and faults pages in."""
    fn(-1)
    times = []
    t_end = time.perf_counter() + budget_s
    i = 0
    while i < reps or (time.perf_counter() < t_end and i < 4 * reps):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return float(np.median(times)) * 1e3


class _Bench:
    """`CpuExperts` over the layer, with a rotating expert cursor so no call finds its weights in cache."""

    def __init__(self, layer: ExpertLayer, seed: int = 0):
        from moecli.runtime.cpu_experts import CpuExperts

        self.layer = layer
        self.cpu = CpuExperts({0: (layer.gate, layer.up, layer.down)}, kernel="auto")
        self.rng = np.random.default_rng(seed)
        self.cursor = 0

    def next_experts(self, m: int) -> np.ndarray:
        E = self.layer.n_expert
        ids = (self.cursor + np.arange(m)) % E
        self.cursor = (self.cursor + m) % E
        return ids.astype(np.int32)

    def single(self, n: int):
        """One expert, n tokens."""
        x = self.rng.standard_normal((n, self.layer.hidden), dtype=np.float32)
        tok, w = np.arange(n, dtype=np.int32), np.ones(n, dtype=np.float32)

        def run(_):
            self.cpu.run(0, x, tok, np.repeat(self.next_experts(1), n), w)
        return run

    def multi(self, m: int):
        """m distinct experts, one token."""
        x = self.rng.standard_normal((1, self.layer.hidden), dtype=np.float32)
        tok, w = np.zeros(m, dtype=np.int32), np.full(m, 1.0 / m, dtype=np.float32)

        def run(_):
            self.cpu.run(0, x, tok, self.next_experts(m), w)
        return run

    def routed(self, n: int, top_k: int, reps: int):
        """n tokens, each to top_k distinct random experts of the layer: the real decode/prefill pattern."""
        E, k = self.layer.n_expert, min(top_k, self.layer.n_expert)
        x = self.rng.standard_normal((n, self.layer.hidden), dtype=np.float32)
        tok = np.repeat(np.arange(n, dtype=np.int32), k)
        routes = [np.argsort(self.rng.random((n, E)), axis=1)[:, :k].reshape(-1).astype(np.int32)
                  for _ in range(reps + 1)]
        w = np.full(n * k, 1.0 / k, dtype=np.float32)

        def run(i):
            self.cpu.run(0, x, tok, routes[i % len(routes)], w)
        return run, routes


def _routed_point(bench: _Bench, layer: ExpertLayer, n: int, reps: int, budget_s: float):
    """Median time of whole-layer calls of n tokens with fresh random top-k routings, and the median
    (experts active, pairs) of those routings."""
    run, routes = bench.routed(n, layer.top_k, reps)
    ms = _median_ms(run, reps, budget_s)
    active = float(np.median([len(np.unique(r)) for r in routes]))
    return ms, active, routes


def cpu_points(tokens=TOKENS, multi=MULTI, error_tokens=ERROR_TOKENS) -> int:
    """How many timed points one `measure_cpu` takes (for a progress bar)."""
    return 2 * len(tokens) + len([m for m in multi if m > 1]) + len(error_tokens)


def measure_cpu(layer: ExpertLayer, threads: int, tokens=TOKENS, multi=MULTI, error_tokens=ERROR_TOKENS,
                reps: int = 5, point_budget_s: float = 0.15, bench: _Bench | None = None, tick=None) -> CpuFit:
    """Fit a, b, first for `layer` at `threads` ggml threads, then check the fit on held-out token counts.

    Fit points: one expert with n tokens (n in `tokens`), m experts with one token each (m in `multi`: separates b
    from the once-per-layer penalty), and whole layers of n tokens with random top-k routing (what the scheduler
    asks the model about: mostly 1-4 tokens per expert in decode and short prefill). The check uses other token
    counts (`error_tokens`) and fresh routings, so it measures the model, not the noise it was fitted to."""
    from moecli.kernels import ggml as G

    G.set_threads(threads)
    bench = bench or _Bench(layer)
    tick = tick or (lambda: None)

    def timed(fn):
        ms = _median_ms(fn, reps, point_budget_s)
        tick()
        return ms

    points = [(1, n, timed(bench.single(n))) for n in tokens]
    points += [(m, m, timed(bench.multi(m))) for m in multi if m > 1]
    k = min(layer.top_k, layer.n_expert)
    for n in tokens:
        ms, active, _ = _routed_point(bench, layer, n, reps, point_budget_s)
        tick()
        points.append((active, n * k, ms))
    a, b, first = fit_cost(points)
    fit = CpuFit(layer.label, layer.quant, threads, a, b, first, layer.expert_bytes, layer.expert_flops, points)
    fit.pieces_first_ms, fit.pieces = fit_pieces(points)
    for n in error_tokens:
        measured, _, routes = _routed_point(bench, layer, n, reps, point_budget_s)
        tick()
        counts = [np.bincount(r, minlength=layer.n_expert) for r in routes]
        # The median of the predictions over the same routings (one layer_ms per routing used).
        pred = float(np.median([fit.layer_ms(c) for c in counts]))
        pw = float(np.median([fit.layer_ms(c, piecewise=True) for c in counts]))
        fit.errors.append({"tokens": n, "predicted_ms": pred, "measured_ms": measured,
                           "error": (pred - measured) / measured, "error_piecewise": (pw - measured) / measured})
    return fit


def mem_bandwidth_gbs(nbytes: int = 256 << 20, threads: int = 1, repeats: int = 3) -> float:
    """STREAM-copy style bandwidth (read + write bytes / s) of a numpy copy split over `threads` threads."""
    n = nbytes // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.zeros(n, dtype=np.float64)  # touched: no page faults inside the timing
    chunks = np.array_split(np.arange(n), threads) if threads > 1 else None
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks] if chunks else [(0, n)]
    best = float("inf")
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda r: np.copyto(dst[r[0]:r[1]], src[r[0]:r[1]]), bounds))
            best = min(best, time.perf_counter() - t0)
    return 2 * n * 8 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# CUDA measurements (run only where torch.cuda.is_available())


@dataclass
class GpuFit:
    g0_ms: float
    g1_ms: float
    dtype: str
    points: list[tuple[int, float]] = field(default_factory=list)  # (tokens, ms)


def measure_gpu_expert(layer: ExpertLayer, tokens=TOKENS, dtype=None, reps: int = 20, device="cuda") -> GpuFit:
    """One expert as the executor runs it: its quantized bytes in a `DeviceExpertCache` slot and `run` (the grouped
    kernels where Triton runs: gate+up+GLU and down in two launches, decode through the workspace and a CUDA
    graph; torch's dequantize + matmuls elsewhere), n tokens routed to it, timed with CUDA events (the host clock on
    the CPU device) -> g0 + g1·n."""
    import torch

    from moecli.models.config import Checkpoint, ExpertStack, ModelConfig
    from moecli.runtime.device_cache import DeviceExpertCache

    dtype = dtype or torch.float32  # the executor's default compute dtype (HybridExperts / DeviceExpertCache)
    dev = torch.device(device)
    c = ModelConfig(arch="profile", n_vocab=1, n_embd=layer.hidden, n_layer=1, n_head=1, n_head_kv=1,
                    head_dim=layer.hidden, n_ctx_train=1, rms_eps=1e-6, rope_theta=1e4, rope_neox=True,
                    n_expert=layer.n_expert, n_expert_used=1,
                    n_ff_exp=layer.ffn)
    experts = {f"blk.0.ffn_{p}_exps": ExpertStack(stacked=getattr(layer, p)) for p in ("gate", "up", "down")}
    cache = DeviceExpertCache(Checkpoint(c, {}, experts), dev, 1, dtype)
    cache.load(0, 0)
    cuda = dev.type == "cuda"

    def timed(x, ids, w) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            cache.run(0, x, ids, w, [0])
        if not cuda:
            return (time.perf_counter() - t0) * 1e3 / reps
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    points = []
    for n in tokens:
        x = torch.randn(n, layer.hidden, device=dev, dtype=dtype)
        ids = torch.zeros((n, 1), dtype=torch.int64, device=dev)
        w = torch.ones((n, 1), dtype=torch.float32, device=dev)
        for _ in range(2):  # first call eager, second captures the decode graph
            cache.run(0, x, ids, w, [0])
        if cuda:
            torch.cuda.synchronize()
        points.append((n, timed(x, ids, w)))
    cache.copy_engine.close()
    g1, g0 = fit_linear([p[0] for p in points], [p[1] for p in points])
    return GpuFit(max(g0, 0.0), max(g1, 0.0), str(dtype).replace("torch.", ""), points)


def measure_pcie(nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """Host -> device: pinned and pageable bandwidth (GB/s) of a big copy, and the latency (ms) of a 4 KiB copy."""
    import torch

    dev = torch.device("cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    pinned = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    pageable = torch.ones(nbytes, dtype=torch.uint8)

    def bw(src, non_blocking):
        best = float("inf")
        for _ in range(reps + 1):  # the first one warms the driver's staging path
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=non_blocking)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    out = {"h2d_pinned_gbs": bw(pinned, True), "h2d_pageable_gbs": bw(pageable, False)}
    small, times = pinned[:4096], []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst[:4096].copy_(small, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["copy_latency_ms"] = float(np.median(times)) * 1e3
    return out


# ---------------------------------------------------------------------------------------------------------------
# everything


@dataclass
class Measurements:
    cpu: list[CpuFit]
    mem_bandwidth_gbs: float
    runtime_threads: int
    gpu: GpuFit | None = None
    pcie: dict | None = None
    seconds: float = 0.0
    bandwidth_threads: int = 0   # threads the memory copy ran on (all of them; not runtime_threads)

    def runtime_fits(self) -> list[CpuFit]:
        return [f for f in self.cpu if f.threads == self.runtime_threads]

    def as_dict(self) -> dict:
        d = asdict(self)
        for f, fd in zip(self.cpu, d["cpu"]):
            fd["fit_error_pct"] = f.fit_error_pct
            fd["piecewise_error_pct"] = f.piecewise_error_pct
        return d


def run(layers: list[ExpertLayer], threads: int, thread_counts=None, tokens=TOKENS, multi=MULTI,
        error_tokens=ERROR_TOKENS, reps: int = 5, point_budget_s: float = 0.15, gpu: bool | None = None,
        mem_bytes: int = 256 << 20, progress=None) -> Measurements:
    """Measure every layer (one per quant) at each thread count (default: 1 and `threads`), the memory bandwidth,
    and on CUDA the device expert and the PCIe figures (of the first layer).

    `progress(step, done, total)`: the step being measured and how far the whole run is, in timed points."""
    from moecli.kernels import ggml as G

    t0 = time.perf_counter()
    counts = sorted(set(thread_counts or (1, threads)))
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    per_fit = cpu_points(tokens, multi, error_tokens)
    total = len(layers) * len(counts) * per_fit + 1 + (2 if gpu and layers else 0)
    done, step = 0, ""
    report = progress or (lambda step, done, total: None)

    def say(text: str) -> None:
        nonlocal step
        step = text
        report(step, done, total)

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        report(step, done, total)

    fits = []
    try:
        for layer in layers:
            bench = _Bench(layer)
            for n in counts:
                say(f"CPU experts {layer.quant}, {n} thread{'s' * (n > 1)}")
                fits.append(measure_cpu(layer, n, tokens, multi, error_tokens, reps, point_budget_s, bench, tick))
            bench.cpu.close()
    finally:
        G.set_threads(threads)  # leave the pool as the runtime will use it
    say(f"memory bandwidth, {threads} thread{'s' * (threads > 1)}")
    bw = mem_bandwidth_gbs(mem_bytes, threads)
    tick()
    m = Measurements(fits, bw, threads, bandwidth_threads=threads)
    if gpu and layers:
        say("GPU expert")
        m.gpu = measure_gpu_expert(layers[0], tokens)
        tick()
        say("PCIe copies")
        m.pcie = measure_pcie()
        tick()
    m.seconds = time.perf_counter() - t0
    return m


def known_quant(quant: str) -> bool:
    """Whether the cost model's geometry tables know this quant name (needed to derive costs for other models)."""
    return quant.upper() in BITS_PER_WEIGHT
