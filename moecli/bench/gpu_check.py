"""`moecli doctor --gpu`: the hybrid path checked on this machine's device, on a synthetic model made on the spot.

Stages, each appended to a JSON-lines file as it finishes (a crash keeps what was done):
  logits   every placement and slot count against the CPU engine (within the ggml-vs-torch spread: FACTS §3)
  graphs   decode steps through the decode kernels replayed as CUDA graphs vs the same kernels eager vs the torch
           path (every expert on the device), and how many segments were captured and replayed
  race     copy/compute torture: the compute stream is delayed (CUDA), the slot being read is evicted and reloaded
           with another expert; both results must equal a fresh cache's, bit for bit
  speed    decode per placement: tok/s, ms per MoE layer, hit rate, syncs and launches per token, cost-model error
  memory   device bytes the executor allocated vs what the plan (profile/plan.py) counts
`--dry-run` runs the same stages on torch's CPU device on a tiny model (CI runs it).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

# Placement × slot counts of the logits stage: every online placement, few / half / all experts on the device.
PLACEMENTS = ["hybrimoe", "hybrimoe-exact", "hybrimoe-sched", "hybrimoe-prefetch", "hybrimoe-cache", "lru",
              "ktransformers", "llama-cpp", "n-cpu-moe", "n-cpu-moe=1"]
SPEED_PLACEMENTS = ["llama-cpp", "n-cpu-moe", "lru", "hybrimoe"]
PROMPT = list(range(1, 25))


def synthetic_model(workdir: Path, dry_run: bool) -> Path:
    """A Q8_0 qwen3moe: tiny (4 layers, 8 experts) for a dry run, Qwen3-30B-A3B's geometry with 4 layers else."""
    from moecli import synth

    if dry_run:
        dims = dataclasses.replace(synth.SynthDims(), n_layer=4, n_head=8)
    else:
        dims = dataclasses.replace(synth.geometry("qwen3-30b-a3b", 4), n_vocab=4096)
    path = workdir / f"doctor-qwen3moe-{'tiny' if dry_run else 'a3b'}-Q8_0.gguf"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        synth.write_gguf(path, "qwen3moe", dims, 0, "Q8_0")
    return path


class Results:
    """Stage records appended to `path` as they come, and echoed as one line each."""

    def __init__(self, path: Path, say: Callable[[str], None]):
        self.path, self.say, self.failed = path, say, []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, stage: str, ok: bool, line: str, **data) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": stage, "ok": ok, "line": line, **data}) + "\n")
        self.say(f"{'ok  ' if ok else 'FAIL'} {stage}: {line}")
        if not ok:
            self.failed.append(stage)


def check_logits(path: Path, device: str, res: Results) -> None:
    import moecli

    cpu = moecli.load(path).logits(PROMPT)
    torch_ref = moecli.load(path, device=device, engine="torch").logits(PROMPT)
    spread = float(np.median(np.abs(cpu - torch_ref).max(-1)))
    E = moecli.load(path).config.n_expert
    worst = 0.0
    for placement in PLACEMENTS:
        for slots in (1, E // 2, E):
            got = moecli.load(path, device=device, placement=placement, expert_slots=slots).logits(PROMPT)
            err = float(np.median(np.abs(got - cpu).max(-1)))
            agree = float((got.argmax(-1) == cpu.argmax(-1)).mean())
            ok = err <= 1.5 * spread + 1e-5 and agree >= 0.9
            worst = max(worst, err)
            if not ok:
                res.add("logits", False, f"{placement} with {slots} slots: median max|Δlogit| {err:.3g} "
                        f"(ggml vs torch spread {spread:.3g}), argmax agreement {agree:.0%}",
                        placement=placement, slots=slots, err=err, spread=spread, agree=agree)
    res.add("logits", "logits" not in res.failed, f"{len(PLACEMENTS)} placements x 3 slot counts vs the CPU "
            f"engine: worst median max|Δlogit| {worst:.3g} (spread {spread:.3g})", worst=worst, spread=spread)


def check_graphs(path: Path, device: str, res: Results, n_steps: int = 6) -> None:
    import os

    import torch

    import moecli
    from moecli.kernels import device_ops
    from moecli.models.loader import load_checkpoint
    from moecli.runtime.step_graphs import StepGraphs

    E = load_checkpoint(path).config.n_expert
    cpu = torch.device(device).type == "cpu"
    env = os.environ.get("MOECLI_CPU_DENSE_KERNELS")
    prompt = PROMPT
    if cpu and device_ops.use_triton("cpu"):  # the dry run: the decode kernels under Triton's interpreter (slow)
        os.environ["MOECLI_CPU_DENSE_KERNELS"], n_steps, prompt = "1", 2, PROMPT[:4]
    try:
        m = moecli.load(path, device=device, placement="n-cpu-moe=0", expert_slots=E)
    finally:
        if env is None:
            os.environ.pop("MOECLI_CPU_DENSE_KERNELS", None)
        else:
            os.environ["MOECLI_CPU_DENSE_KERNELS"] = env
    tr = m.transformer
    if tr.decode is None:
        res.add("graphs", True, f"no decode kernels on {device}: nothing to capture")
        return
    dev = tr.experts.dev

    def steps():
        cache = tr.new_cache(len(prompt) + n_steps)
        tr.forward(prompt, cache)
        return torch.cat([tr.forward([t], cache, all_logits=False) for t in prompt[:n_steps]]).float().cpu().numpy()

    graphs = steps()
    g = (tr.decode.graphs, dev.graphs)
    captured, replays = sum(x.captures for x in g), sum(x.replays for x in g)
    active = g[0].active
    eager = graphs
    if active:  # (without CUDA the segments ran eagerly already)
        tr.decode.graphs, dev.graphs = StepGraphs(device, enabled=False), StepGraphs(device, enabled=False)
        eager = steps()
        tr.decode.graphs, dev.graphs = g
    d, tr.decode = tr.decode, None
    ref = steps()
    tr.decode = d
    scale = float(ref.std())
    vs_eager, vs_torch = float(np.abs(graphs - eager).max()) / scale, float(np.abs(eager - ref).max()) / scale
    ok = vs_eager < 1e-4 and vs_torch < 1e-2 and (not active or replays > 0)
    res.add("graphs", ok, f"{n_steps} decode steps: graphs vs eager {vs_eager:.2g}, decode kernels vs torch path "
            f"{vs_torch:.2g} (max |Δlogit| / std); {captured} segments captured, {replays} replays"
            + ("" if active else " (no CUDA: eager)"), vs_eager=vs_eager, vs_torch=vs_torch, captured=captured,
            replays=replays, active=active)


def check_race(path: Path, device: str, res: Results, trials: int = 8) -> None:
    import torch

    from moecli.models.loader import load_checkpoint
    from moecli.runtime.device_cache import DeviceExpertCache

    ckpt = load_checkpoint(path)
    dev = torch.device(device)
    l = next(l for l in range(ckpt.config.n_layer) if f"blk.{l}.ffn_gate_exps" in ckpt.experts)
    x = torch.randn(4, ckpt.config.n_embd, generator=torch.Generator().manual_seed(0)).to(dev)
    ref = DeviceExpertCache(ckpt, dev, 2)
    want = []
    for e in (0, 1):
        ref.load(l, e)
        want.append(ref.compute(l, e, x))
    cache = DeviceExpertCache(ckpt, dev, 1)
    bad = 0
    for _ in range(trials):
        cache.new_step()
        cache.load(l, 0)
        if dev.type == "cuda":
            torch.cuda._sleep(50_000_000)  # the compute stream lags: expert 0's slot is read well after this line
        y0 = cache.compute(l, 0, x)
        cache.new_step()  # a step never evicts what it read: the next one may, while the read is still queued
        cache.load(l, 1, evict=0)  # into the slot expert 0 is (still) being read from
        y1 = cache.compute(l, 1, x)
        cache.new_step()
        cache.load(l, 0, evict=1)  # and back, while expert 1 is read
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        bad += int(not torch.equal(y0, want[0])) + int(not torch.equal(y1, want[1]))
    how = "delayed compute stream" if dev.type == "cuda" else "synchronous copies (CPU device)"
    res.add("race", bad == 0, f"{trials} evict-and-reload cycles of the slot being read ({how}): "
            f"{bad} results differ from a fresh cache's", trials=trials, mismatches=bad)


def check_speed(path: Path, device: str, res: Results, n_gen: int = 16) -> list[dict]:
    import moecli

    E = moecli.load(path).config.n_expert
    rows = []
    for placement in SPEED_PLACEMENTS:
        slots = E // 2
        m = moecli.load(path, device=device, placement=placement, expert_slots=slots)
        list(m.generate(PROMPT, max_tokens=2, stop_at_eog=False))  # warm-up: graphs, pages, first copies
        before = _snap(m)
        t0 = time.perf_counter()
        n = len(list(m.generate(PROMPT, max_tokens=n_gen, stop_at_eog=False)))
        dt = time.perf_counter() - t0
        after = _snap(m)
        d = {k: after[k] - before[k] for k in after}
        calls = max(d["layer_calls"], 1)
        row = dict(placement=placement, slots=slots, tok_s=n / dt, ms_per_layer=d["layer_ms"] / calls,
                   hit_rate=d["hits"] / max(d["active"], 1), syncs_per_token=d["syncs"] / max(n, 1),
                   launches_per_token=d["launches"] / max(n, 1),
                   cost_model_error=d["predicted_ms"] / d["layer_ms"] - 1 if d["layer_ms"] > 0 else None)
        rows.append(row)
    table = "; ".join(f"{r['placement']} {r['tok_s']:.1f} tok/s, {r['ms_per_layer']:.2f} ms/layer, "
                      f"hit {r['hit_rate']:.0%}, {r['syncs_per_token']:.0f} syncs/tok" for r in rows)
    res.add("speed", all(r["tok_s"] > 0 for r in rows), table, rows=rows)
    return rows


def _snap(m) -> dict:
    st, ex = m.stats, m.transformer.experts
    return dict(layer_ms=sum(st.layer_ms.values()), predicted_ms=sum(st.predicted_ms.values()),
                layer_calls=st.calls * len(ex.layers), hits=st.hits, active=st.active, syncs=st.syncs,
                launches=st.launches)


def check_memory(path: Path, device: str, res: Results) -> None:
    import torch

    import moecli
    from moecli.profile import plan as P

    E = moecli.load(path).config.n_expert
    rows, ok = [], True
    for placement, slots in (("hybrimoe", E // 2), ("n-cpu-moe=2", 0), ("llama-cpp", 0)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
        m = moecli.load(path, device=device, placement=placement, expert_slots=slots, n_ctx=256)
        facts = P.ModelFacts.from_checkpoint(m.checkpoint, path.name)
        total = torch.cuda.get_device_properties(0).total_memory if device.startswith("cuda") else 0
        plan = P.placement_device_bytes(facts, placement, slots, m.n_ctx, total)
        slots_used = m.transformer.experts.dev.storage.numel()
        row = dict(placement=placement, slots=slots, planned_slots=plan["slots"], used_slots=slots_used,
                   planned_total=plan["total"])
        ok &= slots_used == plan["slots"]
        if device.startswith("cuda"):
            row["used_total"] = torch.cuda.memory_allocated() - base
            ok &= row["used_total"] <= plan["total"]
        rows.append(row)
        del m
    line = "; ".join(f"{r['placement']}: slots {r['used_slots'] / 1e6:.1f} MB used / {r['planned_slots'] / 1e6:.1f}"
                     f" MB planned" + (f", all {r['used_total'] / 1e6:.0f} / {r['planned_total'] / 1e6:.0f} MB"
                                       if "used_total" in r else "") for r in rows)
    res.add("memory", ok, line, rows=rows)


def run(device: str, dry_run: bool, output: Path, workdir: Path, say: Callable[[str], None]) -> Results:
    res = Results(output, say)
    t0 = time.perf_counter()
    path = synthetic_model(workdir, dry_run)
    res.add("model", True, f"{path.name} ({path.stat().st_size / 1e6:.0f} MB) on {device}", path=str(path))
    for stage in (check_logits, check_graphs, check_race, check_speed, check_memory):
        try:
            stage(path, device, res)
        except Exception as e:  # a stage that breaks is a finding, not the end of the check
            res.add(stage.__name__.removeprefix("check_"), False, f"{type(e).__name__}: {e}")
    res.add("done", not res.failed, f"{time.perf_counter() - t0:.0f} s, "
            + (f"failed: {', '.join(res.failed)}" if res.failed else "every stage passed"))
    return res
