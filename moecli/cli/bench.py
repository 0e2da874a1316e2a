"""`moecli bench`: benchmarks. `--simulate` predicts hybrid speed from a routing trace and a host profile."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moecli.errors import MoecliError

DEFAULT_TRACE = "../shared/traces/mixtral-8x7b/gsm8k_2_routing.jsonl"


def bench(
    model: Optional[str] = typer.Argument(None, help="Model to benchmark (real runs: not available yet)."),
    simulate: bool = typer.Option(False, "--simulate", help="Simulate placements over a routing trace."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Routing trace file or directory."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Host profile TOML (see profiles/)."),
    model_geometry: Optional[str] = typer.Option(None, "--model-geometry", help="e.g. mixtral-8x7b."),
    cache_ratio: str = typer.Option("0.25,0.5,0.75", "--cache-ratio", help="Device expert cache ratios."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated placements (default: all)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Expert quant type (default: the geometry's)."),
    predictor_accuracy: float = typer.Option(0.9, "--predictor-accuracy",
                                             help="Next-layer prediction accuracy when the trace has none."),
    output: str = typer.Option("table", "-o", "--output", help="table or json."),
) -> None:
    """Benchmark a model, or with --simulate predict hybrid CPU/GPU speed on a host profile."""
    if not simulate:
        raise MoecliError("`moecli bench` on a real model is not available yet in this version; "
                          "use `moecli bench --simulate --trace FILE --profile FILE --model-geometry NAME`")
    from moecli.bench.simulate import parse_ratios, render_table, run_sweep
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


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
