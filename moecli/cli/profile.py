"""`moecli profile [MODEL]`: probe this host, measure the expert kernels, fit the cost model, plan the placement and
write profiles/<host>[-<model>].toml (schema: profiles/README.md). `--estimate-only` measures nothing and writes
nothing: it prints the plan from the probes and the newest profile of this host (or safe defaults)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moecli.errors import MoecliError


def _geometry_from_checkpoint(ckpt, name: str, quant: str, facts):
    """A ModelGeometry for the cost model from the checkpoint's own config (None when its quant mix has no entry
    in the geometry table: then no decode estimate)."""
    from moecli.policy.geometry import BITS_PER_WEIGHT, ModelGeometry

    if quant.upper() not in BITS_PER_WEIGHT:
        return None
    c = ckpt.config
    head = c.n_vocab * c.n_embd
    L = len(facts.moe_layers)
    shared = (1 if c.n_ff_shexp else 0) * 3 * c.n_embd * c.n_ff_shexp
    attn = max((facts.dense_params - head) // max(L, 1) - shared, 0)
    return ModelGeometry(name, L, c.n_embd, c.n_ff_exp, c.n_expert, c.n_expert_used,
                         n_shared=1 if c.n_ff_shexp else 0, shared_ffn=c.n_ff_shexp, attn_params=attn,
                         head_params=head, default_quant=quant.upper())


def _costs(hp, geom, quant):
    from moecli.policy.cost import build_cost_model

    if geom is None:
        return None
    try:
        return build_cost_model(hp, geom, quant)
    except (MoecliError, ZeroDivisionError):
        return None


def _pick_threads(meas, top_k: int) -> int:
    """The measured thread count with the fastest decode layer (first + k experts of one token): on a loaded or
    SMT-only host fewer threads can win, and the runtime should use what was measured to be faster."""
    best = {}
    for f in meas.cpu:
        best.setdefault(f.threads, []).append(f.layer_ms([1] * top_k))
    return min(best, key=lambda n: (sum(best[n]), -n)) if best else meas.runtime_threads


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _print_rich(host, meas, plan, facts, path, source, costs) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True)
    cpu = host.cpu
    out.print(f"[bold]host[/bold] {host.hostname}  ({host.os})")
    out.print(f"  CPU  {cpu.model}: {cpu.physical_cores} physical / {cpu.logical_cores} logical cores, "
              f"best SIMD {cpu.best_simd}; ISA {' '.join(cpu.isa) or '-'}")
    out.print(f"  NUMA {len(host.numa) or 1} node(s)   RAM {_gb(host.ram_total_bytes)} total, "
              f"{_gb(host.ram_available_bytes)} available")
    if host.gpus:
        for g in host.gpus:
            out.print(f"  GPU  cuda:{g.index} {g.name} (sm {g.capability}): {_gb(g.total_bytes)} total, "
                      f"{_gb(g.free_bytes)} free")
    else:
        out.print("  GPU  none (torch sees no CUDA device): everything runs on the CPU")
    if meas is not None:
        t = Table(title=f"CPU expert costs ({meas.cpu[0].model if meas.cpu else ''}, ms)", title_justify="left")
        for col in ("quant", "thr", "a/token", "b/expert", "first", "GB/s", "GFLOPS", "fit err", "2-piece"):
            t.add_column(col, justify="right")
        for f in meas.cpu:
            fe, pe = f.fit_error_pct, f.piecewise_error_pct
            t.add_row(f.quant, str(f.threads) + (" *" if f.threads == meas.runtime_threads else ""),
                      f"{f.a_ms:.4f}", f"{f.b_ms:.4f}", f"{f.first_ms:.4f}", f"{f.stream_gbs:.1f}",
                      f"{f.gflops:.0f}", "-" if fe is None else f"{fe:.1f} %", "-" if pe is None else f"{pe:.1f} %")
        out.print(t)
        for f in meas.runtime_fits():
            checks = ", ".join(f"{e['tokens']} tok: {e['predicted_ms']:.2f} vs {e['measured_ms']:.2f} ms "
                               f"({100 * e['error']:+.0f} %)" for e in f.errors)
            pe = f.piecewise_error_pct
            if pe is not None or f.fit_error_pct is not None:
                used = pe if pe is not None else f.fit_error_pct
                out.print(f"fit error {f.quant} @ {f.threads} threads: {used:.1f} % with the cost model's "
                          f"{'two-piece' if pe is not None else 'single-line'} fit "
                          f"(single line a·n+b: {f.fit_error_pct:.1f} %; {checks})")
        out.print(f"memory bandwidth (copy, {meas.runtime_threads} threads): {meas.mem_bandwidth_gbs:.1f} GB/s"
                  f"   * = threads the runtime will use   measured in {meas.seconds:.1f} s")
        if meas.gpu is not None:
            out.print(f"device expert: g0 {meas.gpu.g0_ms:.4f} ms + g1 {meas.gpu.g1_ms:.5f} ms/token "
                      f"({meas.gpu.dtype})")
        if meas.pcie:
            p = meas.pcie
            out.print(f"host->device: pinned {p['h2d_pinned_gbs']:.1f} GB/s, pageable {p['h2d_pageable_gbs']:.1f} GB/s, "
                      f"latency {p['copy_latency_ms']:.3f} ms")
    out.print(f"[bold]plan[/bold] {plan.model} at ctx {plan.ctx}, {plan.threads} CPU threads, device {plan.device}")
    if plan.vram_total:
        out.print(f"  VRAM free {_gb(plan.vram_free)}: dense {_gb(plan.dense_bytes)} + KV {_gb(plan.kv_bytes)} + "
                  f"margin {_gb(plan.margin_bytes)} -> {_gb(max(plan.expert_budget, 0))} for experts "
                  f"({_gb(facts.expert_bytes)} each)")
    for line in plan.on_device:
        out.print(f"  device: {line}")
    for line in plan.on_cpu:
        out.print(f"  CPU:    {line}")
    out.print(f"  expert slots per layer: {plan.slots_per_layer} of {plan.n_expert} ({plan.device_expert_share:.0%}); "
              f"threads {plan.threads}")
    out.print(f"llama.cpp: {plan.llama_flags}")
    if plan.llama_ot:
        out.print(f"llama.cpp: {plan.llama_ot}")
    if plan.decode_tok_s is not None:
        out.print(f"estimated decode: {plan.decode_tok_s:.1f} tok/s ({plan.decode_note}; costs from {source})")
    else:
        out.print(f"estimated decode: unknown (no cost model for this quant mix; costs from {source})")
    out.print(f"profile written: {path}" if path else "profile not written (--estimate-only measures nothing)")


def profile(
    model: Optional[str] = typer.Argument(None, help="GGUF file, model directory or pulled model name (default: a "
                                          "synthetic Qwen3-30B-A3B-shaped layer in Q4_K and Q8_0)"),
    estimate_only: bool = typer.Option(False, "--estimate-only", help="Plan from probes and the cost model; "
                                       "measure and write nothing."),
    ctx: int = typer.Option(4096, "--ctx", help="Context length the KV cache is sized for."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for experts (default: the faster "
                                          "of 1 and all physical cores, as measured)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Profile file to write (default: "
                                          "$MOECLI_PROFILES or ./profiles, <host>[-<model>].toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the summary."),
) -> None:
    """Probe this host, measure expert costs, fit the cost model, and plan CPU/GPU placement for a model."""
    from moecli.policy.cost import HostProfile, load_profile
    from moecli.policy.geometry import get_geometry
    from moecli.profile import microbench, plan as P, probe, store

    if ctx <= 0:
        raise MoecliError(f"--ctx must be a positive number of tokens, got {ctx}")
    if threads is not None and threads <= 0:
        raise MoecliError(f"--threads must be positive, got {threads}")
    if output is not None and output.is_dir():
        raise MoecliError(f"-o {output}: is a directory (give a .toml file name)")

    host = probe.probe()
    ckpt = None
    if model is not None:
        from moecli.models.loader import load_checkpoint
        from moecli.resolve import resolve_model

        ckpt = load_checkpoint(resolve_model(model))
        label = store.model_key(model)
        layer = microbench.model_layer(ckpt, label)
        facts = P.ModelFacts.from_checkpoint(ckpt, label, quant=layer.quant)
        geom = _geometry_from_checkpoint(ckpt, label, layer.quant, facts)
        quant = layer.quant
    else:
        geom = get_geometry(microbench.SYNTHETIC_SHAPE[0])
        quant = geom.default_quant
        facts = P.ModelFacts.from_geometry(geom, quant)
    n_threads = threads or host.cpu.physical_cores

    meas, path = None, None
    if estimate_only:
        found = store.find_profile(model)
        hp, source = (load_profile(found), str(found)) if found else (store.safe_default_profile(),
                                                                      store.no_profile_message())
    else:
        say = (lambda m: None) if as_json else _progress()
        say("preparing the expert layer(s)")
        layers = ([microbench.model_layer(ckpt, store.model_key(model))] if ckpt is not None
                  else [microbench.synthetic_layer(q) for q in ("Q4_K", "Q8_0")])
        meas = microbench.run(layers, n_threads, thread_counts=sorted({1, n_threads}), progress=say)
        if threads is None:
            meas.runtime_threads = _pick_threads(meas, facts.top_k)
        n_threads = meas.runtime_threads
        doc = store.build_document(host, meas, model)
        # Read the document back the way chat/bench will (TOML -> load_profile's HostProfile) for the estimate.
        from moecli.profile.store import tomllib

        hp, source = HostProfile(doc["host"]["name"], tomllib.loads(store.to_toml(doc))), "this measurement"
    costs = _costs(hp, geom, quant)
    the_plan = P.make_plan(facts, host.gpu, ctx, n_threads, costs)
    if meas is not None:
        path = Path(output) if output else store.default_path(model)
        store.write_profile(store.build_document(host, meas, model, the_plan), path)
        load_profile(path)  # what chat/bench will read must load

    if as_json:
        typer.echo(json.dumps({"host": host.as_dict(), "measurements": meas.as_dict() if meas else None,
                               "plan": the_plan.as_dict(), "cost_source": source,
                               "profile": str(path) if path else None}, indent=2, default=str))
        return
    _print_rich(host, meas, the_plan, facts, path, source, costs)


def _progress():
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    return lambda msg: err.print(f"[dim]measuring: {msg}[/dim]")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
