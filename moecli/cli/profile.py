"""`moecli profile [MODEL]`: probe this host, measure the expert kernels (a progress bar on stderr), fit the cost
model, plan the placement and write <profiles dir>/<host>[-<model>].toml (the user's config dir; schema:
moecli/profiles/README.md). `--estimate-only` measures nothing and writes nothing: it prints the plan from the probes
and the newest profile of this host (or safe defaults)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

from moecli.errors import MoecliError


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


DEFAULT_CTX = 4096   # the context planned for a geometry without a model (no trained length to take)
FIT_WARN_PCT = 25.0  # a cost model this far off its own held-out checks plans poorly: say so


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _threads(n: int) -> str:
    return f"{n} thread{'s' * (n != 1)}"


def _pct(v: float | None) -> str:
    return "-" if v is None else (">999 %" if v > 999 else f"{v:.1f} %")


def fit_warnings(meas) -> list[str]:
    """One line per runtime fit whose held-out error is large (a busy host, or too few repetitions)."""
    out = []
    for f in meas.runtime_fits():
        used = f.piecewise_error_pct if f.piecewise_error_pct is not None else f.fit_error_pct
        if used is not None and used > FIT_WARN_PCT:
            out.append(f"warning: the cost model's fit for {f.quant} at {_threads(f.threads)} is off by {used:.0f} % "
                       f"on held-out measurements (a busy host?): plans and estimates from this profile are rough; "
                       f"run `moecli profile` again on a quiet machine")
    return out


def _print_rich(host, meas, plan, facts, path, source, costs, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
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
        from rich import box

        t = Table(title=f"CPU expert costs ({meas.cpu[0].model if meas.cpu else ''}): ms = first + a·tokens + b "
                        f"per expert", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
        for col in ("quant", "threads", "a ms", "b ms", "first ms", "GB/s", "GFLOP/s", "fit err", "2-piece"):
            t.add_column(col, justify="right", no_wrap=True)
        for f in meas.cpu:
            t.add_row(f.quant, str(f.threads) + (" *" if f.threads == meas.runtime_threads else ""),
                      f"{f.a_ms:.4f}", f"{f.b_ms:.4f}", f"{f.first_ms:.4f}", f"{f.stream_gbs:.1f}",
                      f"{f.gflops:.0f}", _pct(f.fit_error_pct), _pct(f.piecewise_error_pct))
        out.print(t)
        for f in meas.runtime_fits():
            checks = ", ".join(f"{e['tokens']} tok: {e['predicted_ms']:.2f} vs {e['measured_ms']:.2f} ms "
                               f"({100 * e['error']:+.0f} %)" for e in f.errors)
            pe = f.piecewise_error_pct
            if pe is not None or f.fit_error_pct is not None:
                used = pe if pe is not None else f.fit_error_pct
                out.print(f"fit error {f.quant} @ {_threads(f.threads)}: {used:.1f} % with the cost model's "
                          f"{'two-piece' if pe is not None else 'single-line'} fit "
                          f"(single line a·n+b: {f.fit_error_pct:.1f} %; {checks})")
        out.print(f"memory bandwidth {meas.mem_bandwidth_gbs:.1f} GB/s (a copy on "
                  f"{_threads(meas.bandwidth_threads or meas.runtime_threads)}); the runtime will use "
                  f"{_threads(meas.runtime_threads)} (*: the fastest measured); measured in {meas.seconds:.1f} s")
        if meas.gpu is not None:
            out.print(f"device expert: g0 {meas.gpu.g0_ms:.4f} ms + g1 {meas.gpu.g1_ms:.5f} ms/token "
                      f"({meas.gpu.dtype})")
        if meas.pcie:
            p = meas.pcie
            out.print(f"host->device: pinned {p['h2d_pinned_gbs']:.1f} GB/s, pageable {p['h2d_pageable_gbs']:.1f} GB/s, "
                      f"latency {p['copy_latency_ms']:.3f} ms")
    out.print(f"[bold]plan[/bold] {plan.model} at ctx {plan.ctx}, {_threads(plan.threads)} on the CPU, device "
              f"{plan.device}")
    if plan.vram_total:
        out.print(f"  VRAM free {_gb(plan.vram_free)}: dense {_gb(plan.dense_bytes)} + KV {_gb(plan.kv_bytes)} + "
                  f"margin {_gb(plan.margin_bytes)} -> {_gb(max(plan.expert_budget, 0))} for experts "
                  f"({_gb(facts.expert_bytes)} each)")
    for line in plan.on_device:
        out.print(f"  device: {line}")
    for line in plan.on_cpu:
        out.print(f"  CPU:    {line}")
    out.print(f"  expert slots per layer: {plan.slots_per_layer} of {plan.n_expert} ({plan.device_expert_share:.0%})")
    out.print(f"llama.cpp: {plan.llama_flags}")
    if plan.llama_ot:
        out.print(f"llama.cpp: {plan.llama_ot}")
    if plan.decode_tok_s is not None:
        out.print(f"estimated decode: {plan.decode_tok_s:.1f} tok/s ({plan.decode_note}; costs from {source})")
    else:
        out.print(f"estimated decode: unknown (no cost model for this quant mix; costs from {source})")
    out.print(f"profile written: {path}" if path else "profile not written (--estimate-only measures nothing)")
    for line in (fit_warnings(meas) if meas is not None else []) + notes:
        err.print(line)


def profile(
    model: Optional[str] = typer.Argument(None, help="GGUF file, model directory or pulled model name (default: a "
                                          "synthetic Qwen3-30B-A3B-shaped layer in Q4_K and Q8_0)"),
    estimate_only: bool = typer.Option(False, "--estimate-only", help="Plan from probes and the cost model; "
                                       "measure and write nothing."),
    ctx: Optional[int] = typer.Option(None, "-c", "--ctx-size", "--ctx", help="Context length the KV cache is sized "
                                      "for (default: as chat's, the model's trained length, shortened to what fits "
                                      "in RAM; 4096 without a model)", show_default=False),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="CPU threads for experts (default: the "
                                          "faster of 1 and all physical cores, as measured)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Profile file to write (default: "
                                          "<host>[-<model>].toml in $MOECLI_PROFILES or the user's config dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the summary."),
) -> None:
    """Probe this host, measure expert costs, fit the cost model, and plan CPU/GPU placement for a model."""
    from moecli.policy.cost import HostProfile, load_profile
    from moecli.policy.geometry import get_geometry
    from moecli.profile import microbench, plan as P, probe, store
    from moecli.profile.costs import geometry_from_checkpoint

    if ctx is not None and ctx <= 0:
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
        geom = geometry_from_checkpoint(ckpt, label, layer.quant, facts)
        quant = layer.quant
    else:
        geom = get_geometry(microbench.SYNTHETIC_SHAPE[0])
        quant = geom.default_quant
        facts = P.ModelFacts.from_geometry(geom, quant)
    n_threads = threads or host.cpu.physical_cores
    ctx, notes = _check_context(ctx, ckpt, facts)

    meas, path = None, None
    if estimate_only:
        found = store.find_profile(model)
        hp, source = (load_profile(found), str(found)) if found else (store.safe_default_profile(),
                                                                      store.no_profile_message())
        measured = hp.section("cpu").get("threads")
        if threads is None and isinstance(measured, int) and measured > 0:
            n_threads = measured  # the count this host's profile measured to be the fastest: what chat will use
    else:
        with _progress(not as_json) as bar:
            bar("preparing the expert layer(s)", 0, 1)
            layers = ([microbench.model_layer(ckpt, store.model_key(model))] if ckpt is not None
                      else [microbench.synthetic_layer(q) for q in ("Q4_K", "Q8_0")])
            meas = microbench.run(layers, n_threads, thread_counts=sorted({1, n_threads}), progress=bar)
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
                               "profile": str(path) if path else None, "warnings": (
                                   fit_warnings(meas) if meas else []) + notes}, indent=2, default=str))
        return
    _print_rich(host, meas, the_plan, facts, path, source, costs, notes)


def _check_context(ctx: int | None, ckpt, facts) -> tuple[int, list[str]]:
    """(context, notes): the KV cache a plan sizes for must fit this host's RAM (moecli.limits): a one-line error,
    not a plan for terabytes; beyond the model's trained length, a warning; none given, chat's default."""
    from moecli import limits

    per_token = facts.kv_elems_per_token * limits.KV_BYTES
    trained = ckpt.config.n_ctx_train if ckpt is not None else (ctx or DEFAULT_CTX)
    budget = limits.Budget.for_device("cpu", ckpt.file_bytes if ckpt is not None else 0)
    plan = limits.fit_context(ctx, trained, per_token, budget, flag="--ctx")
    return plan.n_ctx, plan.notes


@contextlib.contextmanager
def _progress(show: bool):
    """A Rich bar on stderr over the timed points of the measurement (transient: the summary replaces it)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("measuring {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                   disable=not (show and console.is_terminal))
    with bar:
        task = bar.add_task("", total=1)

        def update(step: str, done: float, total: float) -> None:
            bar.update(task, description=step, completed=done, total=total)

        yield update


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
