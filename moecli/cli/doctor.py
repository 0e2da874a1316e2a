"""`moecli doctor --gpu [--dry-run]`: check the hybrid path on this machine's GPU (moecli/bench/gpu_check.py)."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Optional

import typer

from moecli.errors import MoecliError


def doctor(
    gpu: bool = typer.Option(False, "--gpu", help="Check the hybrid CPU/GPU path: logits of every placement, a "
                                                  "copy/compute race torture, a speed table, memory vs plan."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Every stage on torch's CPU device, on a tiny model."),
    device: str = typer.Option("cuda", "--device", help="The GPU to check (cuda, cuda:N)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="JSON-lines results, written as each stage "
                                                                       "ends (default: the cache's doctor/)."),
) -> None:
    """Check this machine: each stage prints one line and is saved as it finishes; non-zero exit if one fails."""
    from moecli.bench import gpu_check
    from moecli.devices import resolve_device
    from moecli.paths import cache_dir

    if not gpu:
        raise MoecliError("nothing to check: give --gpu (with --dry-run on a machine without a GPU)")
    if dry_run:
        dev = "cpu"
    else:
        dev = resolve_device(device)
        if dev == "cpu":
            raise MoecliError("no GPU here: `moecli doctor --gpu --dry-run` runs every stage on the CPU device")
    work = cache_dir() / "doctor"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = output or work / f"gpu-{'dry-run' if dry_run else 'cuda'}-{stamp}.jsonl"
    res = gpu_check.run(dev, dry_run, out, work, lambda line: typer.echo(line))
    typer.echo(f"results: {out}", err=True)
    if res.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
