"""`moecli bench`: llama-bench-like benchmarks of a model (optionally against llama.cpp on the same file), or with
`--simulate` a prediction of hybrid speed from a routing trace and a host profile."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moecli.errors import MoecliError

DEFAULT_TRACE = "../shared/traces/mixtral-8x7b/gsm8k_2_routing.jsonl"


def bench(
    model: Optional[str] = typer.Argument(None, help="GGUF file, model directory or pulled name "
                                                      "(default: the embedded SmolLM2-135M)."),
    vs_llama_cpp: bool = typer.Option(False, "--vs-llama-cpp", help="Also run llama.cpp on the same file."),
    reps: int = typer.Option(5, "-r", "--repetitions", help="Timed repetitions per test (after one warm-up)."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="CPU threads (default: physical cores)."),
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="Prompt tokens of the pp test (0: none)."),
    n_gen: int = typer.Option(128, "-n", "--n-gen", help="Decode steps of the tg test (0: none)."),
    depths: str = typer.Option("0", "-d", "--depth", help="Comma-separated KV-cache depths, e.g. 0,512."),
    engine: str = typer.Option("ggml", "--engine", help="Comma-separated engines: ggml, torch."),
    placement: Optional[str] = typer.Option(None, "--placement", help="Comma-separated placements (hybrid engine, "
                                                                          "e.g. hybrimoe,lru); replaces --engine."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Benchmark a random-weight model of this "
                                                                       "geometry (e.g. qwen3-30b-a3b), cached."),
    layers: int = typer.Option(4, "--layers", help="Layers of the --synthetic model."),
    simulate: bool = typer.Option(False, "--simulate", help="Simulate placements over a routing trace."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Routing trace file or directory."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Host profile TOML (see profiles/)."),
    model_geometry: Optional[str] = typer.Option(None, "--model-geometry", help="e.g. mixtral-8x7b."),
    cache_ratio: str = typer.Option("0.25,0.5,0.75", "--cache-ratio", help="Device expert cache ratios."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated placements (default: all)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="--synthetic: file type (default Q4_K_M); "
                                                              "--simulate: expert quant type."),
    predictor_accuracy: float = typer.Option(0.9, "--predictor-accuracy",
                                             help="Next-layer prediction accuracy when the trace has none."),
    output: str = typer.Option("md", "-o", "--output", help="md (table), json or csv."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", "-fa/-no-fa",
                                    help="Flash attention for prompts, on both sides (llama.cpp: auto / off)."),
    serve: bool = typer.Option(False, "--serve", help="Load-test `moecli serve` (with --vs-llama-cpp also "
                                                      "llama_cpp.server): aggregate tok/s per --streams, TTFT."),
    streams: str = typer.Option("1,2,4,8", "--streams", help="--serve: concurrent client streams to test."),
    requests: int = typer.Option(2, "--requests", help="--serve: requests per stream."),
) -> None:
    """Benchmark a model like llama-bench (pp/tg tokens/s, optionally vs llama.cpp), or with --simulate predict
    hybrid CPU/GPU speed on a host profile."""
    if serve:
        from moecli.bench.serve import main as bench_serve

        if synthetic is not None:  # a random-weight MoE of a real geometry, cached
            from moecli.bench.run import synthetic_model

            model = str(synthetic_model(synthetic, layers, quant or "Q4_K_M", echo=lambda m: typer.echo(m, err=True)))
        typer.echo(bench_serve(model, streams, requests, n_prompt, n_gen, threads, 4096, vs_llama_cpp, reps, output,
                               lambda m: typer.echo(m, err=True)))
        return
    if not simulate:
        _bench_real(model, vs_llama_cpp, reps, threads, n_prompt, n_gen, depths, engine, placement, synthetic,
                    layers, quant, output, flash_attn)
        return
    from moecli.bench.simulate import parse_ratios, render_table, run_sweep

    output = "table" if output == "md" else output
    from moecli.policy.geometry import get_geometry

    if output not in ("table", "json"):
        raise MoecliError(f"bad output format {output!r}: use table or json")
    if profile is None:
        raise MoecliError("--simulate needs --profile FILE (reference hosts are in profiles/)")
    if model_geometry is None:
        raise MoecliError("--simulate needs --model-geometry NAME (e.g. mixtral-8x7b)")
    if not 0.0 <= predictor_accuracy <= 1.0:
        raise MoecliError("--predictor-accuracy must be within [0, 1]")
    get_geometry(model_geometry)
    ratios = parse_ratios(cache_ratio)
    trace = trace or Path(DEFAULT_TRACE)
    if not trace.exists():
        raise MoecliError(f"trace not found: {trace}")
    pols = [p for p in policies.split(",") if p.strip()] if policies else None
    out = run_sweep(trace, profile, model_geometry, ratios, pols, quant, predictor_accuracy)
    if output == "json":
        typer.echo(json.dumps(out, indent=1))
    else:
        render_table(out)


def _parse_depths(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoecliError(f"bad --depth {text!r}: use comma-separated token counts, e.g. 0,512") from None
    if not out or any(d < 0 for d in out):
        raise MoecliError(f"bad --depth {text!r}: use comma-separated token counts >= 0, e.g. 0,512")
    return sorted(set(out), key=out.index)


def _bench_real(model, vs_llama_cpp, reps, threads, n_prompt, n_gen, depths, engine, placement, synthetic, layers,
                quant, output, flash_attn=True) -> None:
    from moecli.bench import run as R
    from moecli.resolve import PULL_HINT, resolve_model

    if output == "table":
        output = "md"
    if output not in ("md", "json", "csv"):
        raise MoecliError(f"bad output format {output!r}: use md, json or csv")
    if reps < 1:
        raise MoecliError(f"-r must be at least 1, got {reps}")
    if threads is not None and threads < 1:
        raise MoecliError(f"-t must be at least 1, got {threads}")
    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise MoecliError("-p and -n must be >= 0 and not both 0")
    dlist = _parse_depths(depths)
    engines = [e.strip() for e in engine.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("ggml", "torch")]
    if bad or not engines:
        raise MoecliError(f"unknown engine {bad[0] if bad else engine!r} (ggml, torch)")
    placements = [p.strip() for p in placement.split(",") if p.strip()] if placement else []
    if placement is not None and not placements:
        raise MoecliError("--placement needs at least one name")
    if synthetic is not None:
        if model is not None:
            raise MoecliError("give either MODEL or --synthetic GEOMETRY, not both")
        if layers < 1:
            raise MoecliError(f"--layers must be at least 1, got {layers}")
        path = R.synthetic_model(synthetic, layers, quant or "Q4_K_M", echo=lambda m: typer.echo(m, err=True))
    else:
        if quant is not None:
            raise MoecliError("--quant applies to --synthetic (or --simulate) only")
        path = resolve_model(model)
        if model is None:
            typer.echo(f"no MODEL given: benchmarking the embedded {path.name} (dense). For a real MoE: "
                       f"`{PULL_HINT}`, or `moecli bench --synthetic qwen3-30b-a3b --layers 4`", err=True)
    if vs_llama_cpp and Path(path).is_dir():
        raise MoecliError("--vs-llama-cpp needs a GGUF file (llama.cpp cannot read a safetensors directory)")
    base = dict(model=str(path), n_prompt=n_prompt, n_gen=n_gen, depths=dlist, reps=reps, threads=threads,
                flash_attn=flash_attn)
    specs = ([R.BenchSpec(**base, engine="hybrid", placement=p) for p in placements] if placements
             else [R.BenchSpec(**base, engine=e) for e in engines])
    runs = [R.bench_moecli(s) for s in specs]
    ref = R.bench_llama_cpp(R.BenchSpec(**base)) if vs_llama_cpp else None
    summaries = [R.compare(r, ref) for r in runs]
    if output == "json":
        out = dict(summaries[0])
        if len(summaries) > 1:
            out["runs"] = summaries
        out["settings"] = dict(reps=reps, n_prompt=n_prompt, n_gen=n_gen, depths=dlist, seed=R.SEED)
        typer.echo(json.dumps(out, indent=1))
    elif output == "csv":
        typer.echo(R.render_csv(runs + ([ref] if ref else [])), nl=False)
    else:
        typer.echo(R.render_markdown(runs + ([ref] if ref else []), summaries[0]))
        for s in summaries[1:]:
            if s.get("ratio"):
                typer.echo(f"{s['engine']} / llama.cpp: " + ", ".join(f"{k.replace('_at_', ' @ ')} {v:.2f}x"
                                                                       for k, v in s["ratio"].items()))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
