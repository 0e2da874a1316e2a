"""`moecli bench`: llama-bench-like benchmarks of a model (optionally against llama.cpp on the same file), or with
`--simulate` a prediction of hybrid speed from a routing trace and a host profile."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moecli.errors import MoecliError

def bench(
    model: Optional[str] = typer.Argument(None, help="GGUF file, model directory or pulled name "
                                                      "(default: the embedded SmolLM2-135M)."),
    vs_llama_cpp: bool = typer.Option(False, "--vs-llama-cpp", help="Also run llama.cpp on the same file."),
    reps: int = typer.Option(5, "-r", "--repetitions", help="Timed repetitions per test (after one warm-up)."),
    threads: Optional[str] = typer.Option(None, "-t", "--threads", help="CPU threads, comma-separated for one run "
                                                                         "each, e.g. 1,2 (default: physical cores)."),
    n_prompt: str = typer.Option("512", "-p", "--n-prompt", help="Prompt tokens of the pp tests, comma-separated "
                                                                "(0: none)."),
    n_gen: str = typer.Option("128", "-n", "--n-gen", help="Decode steps of the tg tests, comma-separated (0: none)."),
    depths: str = typer.Option("0", "-d", "--n-depth", "--depth", help="Comma-separated KV-cache depths, e.g. 0,512."),
    engine: str = typer.Option("ggml", "--engine", help="Comma-separated engines: ggml, torch."),
    placement: Optional[str] = typer.Option(None, "--placement", help="Comma-separated placements (hybrid engine, "
                                                                          "e.g. hybrimoe,lru); replaces --engine."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Benchmark a random-weight model of this "
                                                                       "geometry (e.g. qwen3-30b-a3b), cached."),
    layers: int = typer.Option(4, "--layers", help="Layers of the --synthetic model."),
    device: str = typer.Option("cpu", "--device", help="Device of the hybrid path (--placement): cpu, cuda, "
                                                       "cuda:N; llama.cpp offloads to the GPU when built with CUDA."),
    expert_slots: int = typer.Option(0, "--expert-slots", min=0, help="Device expert slots per layer "
                                                                      "(--placement)."),
    simulate: bool = typer.Option(False, "--simulate", help="Simulate placements over a routing trace."),
    replay: Optional[Path] = typer.Option(None, "--replay", help="A trace `chat --record-trace` wrote: the "
                                                                  "simulator's TBT vs the executor's measured one."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Routing trace file or directory (default: the "
                                                               "newest in the user's traces directory)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Host profile: a name (hybrimoe-testbed, "
                                                                  "desktop-4090, laptop-8gb, or one `moecli profile` "
                                                                  "wrote) or a TOML file."),
    model_geometry: Optional[str] = typer.Option(None, "--model-geometry", help="e.g. mixtral-8x7b."),
    cache_ratio: str = typer.Option("0.25,0.5,0.75", "--cache-ratio", help="Device expert cache ratios."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated placements (default: all)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="--synthetic: file type (default Q4_K_M); "
                                                              "--simulate: expert quant type."),
    predictor_accuracy: float = typer.Option(0.9, "--predictor-accuracy",
                                             help="Next-layer prediction accuracy when the trace has none."),
    routing: str = typer.Option("both", "--routing", help="--simulate, layers a trace marks routed early "
                                "(SmallThinker): both (certain prefetch before attention, and predictions), known "
                                "(certain prefetch only), predicted (as any layer); several, comma-separated: "
                                "the later ones as NAME/known, NAME/pred."),
    output: Optional[str] = typer.Option(
        None, "-o", "--output", help="md (a markdown table, the default), csv, json or jsonl (one record per test, "
        "as it finishes); --simulate: table (the default: one table within 80 columns), md, csv or json.",
        show_default=False),
    plot: Optional[str] = typer.Option(None, "--plot", help="--simulate: draw TBT and TTFT per policy against the "
                                                            "cache ratio into FILE.png, or '-' in the terminal."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", "-fa/-no-fa",
                                    help="Flash attention for prompts, on both sides (llama.cpp: auto / off)."),
    serve: bool = typer.Option(False, "--serve", help="Load-test `moecli serve` (with --vs-llama-cpp also "
                                                      "llama_cpp.server): aggregate tok/s per --streams, TTFT."),
    streams: str = typer.Option("1,2,4,8", "--streams", help="--serve: concurrent client streams to test."),
    requests: int = typer.Option(2, "--requests", help="--serve: requests per stream."),
    kernels: bool = typer.Option(False, "--kernels", help="Benchmark the device kernels per GGUF type and weight "
                                                          "shape (Triton vs the torch fallback; --quant: types)."),
    exact: bool = typer.Option(False, "--exact", help="moecli in exact mode (llama.cpp's kernel choices, logits "
                                                      "bit-identical); llama.cpp with an F32 KV cache and flash "
                                                      "attention off, the settings those logits match."),
) -> None:
    """Benchmark a model like llama-bench (pp/tg tokens/s, optionally vs llama.cpp), or with --simulate predict
    hybrid CPU/GPU speed on a host profile."""
    if replay is not None:
        from moecli.bench import replay as RP

        out = RP.compare(replay)
        typer.echo(json.dumps(out, indent=1) if output == "json" else RP.render(out), nl=False)
        return
    if kernels:
        from gguf import GGMLQuantizationType

        from moecli.bench.kernels import bench_device

        types = [q.strip().upper() for q in quant.split(",")] if quant else None
        bad = [q for q in types or () if q not in GGMLQuantizationType.__members__]
        if bad:
            raise MoecliError(f"--quant: unknown GGUF type(s) {', '.join(bad)}")
        bench_device(types, echo=typer.echo)
        return
    if serve:
        from moecli.bench.serve import main as bench_serve
        from moecli.bench.synthetic import synthetic_model

        if synthetic is not None:  # a random-weight MoE of a real geometry, cached
            model = str(synthetic_model(synthetic, layers, quant or "Q4_K_M", echo=lambda m: typer.echo(m, err=True)))
        prompts, gens = int_list(n_prompt, "-p", 1), int_list(n_gen, "-n", 1)
        thread_list = int_list(threads, "-t", 1) if threads is not None else [None]
        if len(prompts) > 1 or len(gens) > 1 or len(thread_list) > 1:
            raise MoecliError("--serve takes one -p, -n and -t value (the concurrency list is --streams)")
        typer.echo(bench_serve(model, streams, requests, prompts[0], gens[0], thread_list[0], 4096, vs_llama_cpp,
                               reps, output, lambda m: typer.echo(m, err=True)))
        return
    if not simulate:
        if plot is not None:
            raise MoecliError("--plot draws --simulate's results (the real benchmark prints rows: -o csv for a plot)")
        _bench_real(model, vs_llama_cpp, reps, threads, n_prompt, n_gen, depths, engine, placement, synthetic,
                    layers, quant, output or "md", flash_attn, device, expert_slots, exact)
        return
    _simulate(trace, profile, model_geometry, cache_ratio, policies, quant, predictor_accuracy, output or "table",
              plot, routing)


def _simulate(trace, profile, model_geometry, cache_ratio, policies, quant, predictor_accuracy, output, plot,
              routing="both") -> None:
    from moecli.bench import simulate as S
    from moecli.policy.geometry import get_geometry
    from moecli.profile import store

    if output not in S.FORMATS:
        raise MoecliError(f"bad output format {output!r}: use {', '.join(S.FORMATS)}")
    if profile is None:
        raise MoecliError(f"--simulate needs --profile NAME or FILE (reference hosts: "
                          f"{', '.join(store.reference_names())})")
    profile = store.resolve_profile(profile)
    if model_geometry is None:
        raise MoecliError("--simulate needs --model-geometry NAME (e.g. mixtral-8x7b)")
    if not 0.0 <= predictor_accuracy <= 1.0:
        raise MoecliError("--predictor-accuracy must be within [0, 1]")
    S.parse_routing(routing)
    geometry = get_geometry(model_geometry)
    ratios = S.parse_ratios(cache_ratio)
    if plot is not None and plot != "-" and not plot.lower().endswith(".png"):
        raise MoecliError(f"--plot {plot}: give a .png file name, or '-' for a plot in the terminal")
    if trace is None:
        trace = S.default_trace(lambda m: typer.echo(m, err=True))
    elif not trace.exists():
        raise MoecliError(f"trace not found: {trace}")
    pols = [p for p in policies.split(",") if p.strip()] if policies else None
    out = S.run_sweep(trace, profile, model_geometry, ratios, pols, quant, predictor_accuracy, routing=routing)
    for line in S.coverage_warnings(out, geometry):
        typer.echo(line, err=True)
    typer.echo(S.render(out, output), nl=False)
    if plot == "-":
        from moecli.bench.plot import terminal_plot

        typer.echo(terminal_plot(out))
    elif plot is not None:
        from moecli.bench.plot import png_plot

        typer.echo(f"plot written: {png_plot(out, Path(plot))}", err=True)


def int_list(text: str, flag: str, least: int = 0) -> list[int]:
    """llama-bench's comma lists: '64,128' -> [64, 128], each at least `least`, duplicates dropped."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise MoecliError(f"bad {flag} {text!r}: use comma-separated integers, e.g. {flag} 64,128") from None
    if not out or any(v < least for v in out):
        raise MoecliError(f"bad {flag} {text!r}: every value must be >= {least}")
    return sorted(set(out), key=out.index)


def _bench_real(model, vs_llama_cpp, reps, threads, n_prompt, n_gen, depths, engine, placement, synthetic, layers,
                quant, output, flash_attn=True, device="cpu", expert_slots=0, exact=False) -> None:
    from moecli.bench import report, run as R
    from moecli.bench.synthetic import synthetic_model
    from moecli.resolve import PULL_HINT, resolve_model

    if output == "table":
        output = "md"
    if output not in ("md", "json", "jsonl", "csv"):
        raise MoecliError(f"bad output format {output!r}: use md, csv, json or jsonl")
    if reps < 1:
        raise MoecliError(f"-r must be at least 1, got {reps}")
    thread_list = int_list(threads, "-t", 1) if threads is not None else [None]
    prompts, gens = int_list(n_prompt, "-p"), int_list(n_gen, "-n")
    if not any(prompts) and not any(gens):
        raise MoecliError("-p and -n must be >= 0 and not both 0")
    dlist = int_list(depths, "-d")
    engines = [e.strip() for e in engine.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("ggml", "torch")]
    if bad or not engines:
        raise MoecliError(f"unknown engine {bad[0] if bad else engine!r} (ggml, torch)")
    placements = [p.strip() for p in placement.split(",") if p.strip()] if placement else []
    if placement is not None and not placements:
        raise MoecliError("--placement needs at least one name")
    if exact and (placements or engines != ["ggml"]):
        raise MoecliError("--exact benchmarks the ggml CPU engine: use it without --placement or --engine torch")
    if synthetic is not None:
        if model is not None:
            raise MoecliError("give either MODEL or --synthetic GEOMETRY, not both")
        if layers < 1:
            raise MoecliError(f"--layers must be at least 1, got {layers}")
        path = synthetic_model(synthetic, layers, quant or "Q4_K_M", echo=lambda m: typer.echo(m, err=True))
    else:
        if quant is not None:
            raise MoecliError("--quant applies to --synthetic (or --simulate) only")
        path = resolve_model(model)
        if model is None:
            typer.echo(f"no MODEL given: benchmarking the embedded {path.name} (dense). For a real MoE: "
                       f"`{PULL_HINT}`, or `moecli bench --synthetic qwen3-30b-a3b --layers 4`", err=True)
    from moecli.devices import resolve_device

    device = resolve_device(device)
    if (device != "cpu" or expert_slots) and not placements:
        raise MoecliError("--device and --expert-slots choose the hybrid path: give --placement too")
    if vs_llama_cpp and Path(path).is_dir():
        raise MoecliError("--vs-llama-cpp needs a GGUF file (llama.cpp cannot read a safetensors directory)")
    rep = report.Report(output, placements=bool(placements))
    callbacks = dict(on_row=rep.on_row, on_event=rep.on_event)
    runs, refs, summaries = [], [], []
    for t in thread_list:  # as llama-bench: every engine at one thread count, then the next count
        base = dict(model=str(path), n_prompt=prompts, n_gen=gens, depths=dlist, reps=reps, threads=t,
                    flash_attn=flash_attn and not exact, exact=exact)
        specs = ([R.BenchSpec(**base, engine="hybrid", placement=p, device=device, expert_slots=expert_slots)
                  for p in placements] if placements else [R.BenchSpec(**base, engine=e) for e in engines])
        mine = [R.bench_moecli(s, **callbacks) for s in specs]
        answers: dict[str, dict] = {}  # placement (or engine) -> the llama.cpp run it is compared with
        if vs_llama_cpp:
            for ref_spec, ps in R.llama_cpp_specs(R.BenchSpec(**base), device, placements, expert_slots,
                                                  lambda m: typer.echo(m, err=True)):
                ref = R.bench_llama_cpp(ref_spec, **callbacks)
                refs.append(ref)
                answers.update({p: ref for p in ps} if ps else {s.engine: ref for s in specs})
        runs += mine
        summaries += [R.compare(r, answers.get(s.placement or s.engine)) for s, r in zip(specs, mine)]
    rep.finish(runs, summaries, refs, dict(reps=reps, n_prompt=prompts, n_gen=gens, depths=dlist, seed=R.SEED))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
