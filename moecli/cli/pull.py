"""`moecli pull`, `list`, `show`, `rm`: models in the Hugging Face cache."""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import typer

from moecli import hub
from moecli.errors import MoecliError


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class RichProgress(hub.Progress):
    """One Rich bar per file: size done/total, speed and ETA, on stderr (stdout stays parseable)."""

    def __init__(self):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=_console(stderr=True), transient=False)
        self.task = None

    def start(self, name, total, done):
        if self.task is None:
            self.bar.start()
        label = name if len(name) <= 48 else "…" + name[-47:]
        self.task = self.bar.add_task(label + (" (resuming)" if done else ""), total=total, completed=done)

    def advance(self, n):
        if self.task is not None:
            self.bar.advance(self.task, n)

    def finish(self):
        pass

    def close(self):
        if self.task is not None:
            self.bar.stop()

    def note(self, text):
        self.bar.console.print(text)


def pull(
    name: str = typer.Argument(..., help="owner/repo[:QUANT] or hf.co/owner/repo[:QUANT] (GGUF quant, default Q4_K_M)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)"),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN)",
                                        show_default=False),
    offline: bool = typer.Option(False, "--offline", help="Use the local cache only"),
    verify: bool = typer.Option(False, "--verify", help="Re-hash files already in the cache"),
) -> None:
    """Download a model into the Hugging Face cache (resumable, SHA-256 verified)."""
    local = Path(name).expanduser()
    if local.exists() and not name.startswith(("hf.co/", "huggingface.co/")):
        typer.echo(f"{local} is a local {'directory' if local.is_dir() else 'file'}: nothing to pull "
                   f"(use it directly: moecli chat {local})")
        return
    result = pull_with_progress(name, revision=revision, token=token, offline=offline, verify_cached=verify)
    size = sum(p.stat().st_size for p in result.files)
    how = "from the cache" if offline or hub.env_offline() else (
        f"{hub.fmt_bytes(result.downloaded_bytes)} downloaded" if result.downloaded_bytes else "already up to date")
    n = len(result.files)
    typer.echo(f"{result.ref.name} ({result.fmt}, {n} file{'s' * (n != 1)}, {hub.fmt_bytes(size)}, "
               f"{how}, commit {result.commit[:12]})")
    typer.echo(str(result.path))


def pull_with_progress(name: str, **options) -> hub.PullResult:
    """hub.pull with Rich bars on stderr; Ctrl-C says how to resume and exits 130."""
    progress = RichProgress()
    try:
        return hub.pull(name, progress=progress, **options)
    except KeyboardInterrupt:
        # Typer turns Ctrl-C into a silent exit 0 under standalone_mode=False; say it and exit 130 ourselves.
        progress.close()
        typer.echo("error: pull interrupted: run the same command again to resume", err=True)
        raise SystemExit(130)  # not typer.Exit: click returns its code instead of exiting (standalone_mode=False)
    finally:
        progress.close()


def resolve_or_pull(name: str | None, say) -> Path:
    """What `chat NAME` runs, as ollama's `run`: a local path or a pulled model, else a model name is pulled first
    (unless offline); anything else is the resolver's one-line error."""
    from moecli.resolve import resolve_model

    try:
        return resolve_model(name)
    except MoecliError as not_found:
        if name is None or Path(name).expanduser().exists() or hub.env_offline() or not _is_model_name(name):
            raise not_found from None
        say(f"{name} is not in the cache: pulling it first (as `moecli pull {name}`)")
    return pull_with_progress(name).path


def _is_model_name(name: str) -> bool:
    try:
        hub.parse_name(name)
    except MoecliError:
        return False
    return not name.lower().endswith((".gguf", ".safetensors", ".json"))  # a missing file, not a repo


def list_models() -> None:
    """List pulled models: name, format/quant, size, path; interrupted pulls too (`moecli pull` resumes them)."""
    from rich.table import Table

    models, partial = hub.local_models(), hub.partial_downloads()
    if not models and not partial:
        typer.echo(f"no pulled models in {hub.cache_dir()} (try: moecli pull Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M)")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "FORMAT", "SIZE", "REVISION", "PATH"):
        table.add_column(col, no_wrap=col != "PATH", overflow="fold", justify="right" if col == "SIZE" else "left")
    for m in models:
        fmt = f"gguf {m.quant}" if m.fmt == "gguf" else m.fmt
        if not m.complete:
            fmt += " (incomplete)"
        rev = ",".join(m.refs) or m.commit[:12]
        table.add_row(m.name, fmt, hub.fmt_bytes(m.size), rev, str(m.path))
    for d in partial:
        of = f" of {hub.fmt_bytes(d.size)}" if d.size else ""
        kind = f"gguf {d.quant}" if d.quant else "files"
        table.add_row(d.name, f"{kind} (partial: {hub.fmt_bytes(d.done)}{of}; `moecli pull {d.name}` resumes)",
                      hub.fmt_bytes(d.done), "-", str(hub.storage_folder(d.repo_id) / "blobs"))
    _console().print(table)


# ---------------------------------------------------------------- show

def summarize(ckpt) -> dict:
    """Parameters (total and active per token), expert geometry and the quant mix of a loaded checkpoint."""
    c = ckpt.config
    total = sum(t.n_elements for t in ckpt.tensors.values())
    by_type: dict[str, int] = defaultdict(int)
    for t in ckpt.tensors.values():
        by_type[t.type.name] += t.nbytes
    expert_params = 0
    for stack in ckpt.experts.values():
        n = stack.n * math.prod(stack.ne)
        expert_params += n
        if stack.stacked is None or stack.stacked.name not in ckpt.tensors:  # safetensors: not in `tensors`
            total += n
            for e in range(stack.n):
                t = stack.expert(e)
                by_type[t.type.name] += t.nbytes
            if stack.bias is not None:
                total += stack.bias.n_elements
                by_type[stack.bias.type.name] += stack.bias.nbytes
    # layers the file holds beyond the forward pass (GLM's NextN): counted in the total, never run
    skipped = sum(t.n_elements for name, t in ckpt.tensors.items()
                  if name.startswith("blk.") and int(name.split(".")[1]) >= c.n_layer)
    active = total - expert_params - skipped
    if c.n_expert:
        active += expert_params * c.n_expert_used // c.n_expert
    weight_bytes = sum(by_type.values()) or 1
    mix = sorted(((k, v, v / weight_bytes) for k, v in by_type.items()), key=lambda x: -x[1])
    return {"arch": c.arch, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_head_kv": c.n_head_kv,
            "n_vocab": c.n_vocab, "n_ctx_train": c.n_ctx_train, "n_expert": c.n_expert, "n_expert_used": c.n_expert_used,
            "n_ff_exp": c.n_ff_exp, "n_ff_shexp": c.n_ff_shexp, "params_total": total, "params_active": active,
            "expert_params": expert_params, "quant_mix": mix, "file_bytes": ckpt.file_bytes, "layers": layer_kinds(c)}


def layer_kinds(c) -> str:
    """"1 dense + 45 MoE, + 1 NextN (skipped)": the kinds of layers a forward pass runs."""
    from moecli.models.spec import moe_layer

    moe = sum(moe_layer(c, l) for l in range(c.n_layer))  # leading dense (DeepSeek, GLM), interleaved (llama4)
    text = " + ".join(f"{n} {kind}" for n, kind in ((c.n_layer - moe, "dense"), (moe, "MoE")) if n)
    if c.recurrent_layers:
        text += f" ({len(c.recurrent_layers)} Gated DeltaNet, {c.n_layer - len(c.recurrent_layers)} attention)"
    if c.swa_layers:
        text += f" ({len(c.swa_layers)} with {'chunked' if c.attn_chunk else 'sliding-window'} attention)"
    if c.n_nextn_layers:
        text += f", + {c.n_nextn_layers} NextN (held, skipped)"
    return text


def host_ram() -> tuple[int, str]:
    """(bytes of RAM, where the number comes from)."""
    import psutil

    return psutil.virtual_memory().total, "psutil"


def show(name: str = typer.Argument(..., help="Pulled model name, GGUF file or model directory")) -> None:
    """Architecture, parameters (total/active), experts, quant mix, size, and whether it fits this host's RAM."""
    from moecli.models.loader import load_checkpoint
    from moecli.resolve import resolve_model

    path = resolve_model(name)
    s = summarize(load_checkpoint(path))
    out = _console()
    same = Path(name).expanduser().resolve() == path.resolve()
    out.print(f"[bold]{name}[/bold]" if same else f"[bold]{name}[/bold]  {path}")  # a path is shown once
    out.print(f"architecture  {s['arch']}: {s['n_layer']} layers, width {s['n_embd']}, "
              f"{s['n_head']} heads ({s['n_head_kv']} KV), vocab {s['n_vocab']}, context {s['n_ctx_train']}")
    out.print(f"layers        {s['layers']}")
    out.print(f"parameters    {_count(s['params_total'])} total, {_count(s['params_active'])} active per token")
    if s["n_expert"]:
        shared = f", shared expert FFN {s['n_ff_shexp']}" if s["n_ff_shexp"] else ""
        out.print(f"experts       {s['n_expert']} per layer, top-{s['n_expert_used']}, expert FFN {s['n_ff_exp']}"
                  f"{shared} ({_count(s['expert_params'])} expert parameters)")
    else:
        out.print("experts       none (dense model)")
    mix = ", ".join(f"{k} {share:.1%} ({hub.fmt_bytes(b)})" for k, b, share in s["quant_mix"])
    out.print(f"quant mix     {mix}")
    ram, source = host_ram()
    need = s["file_bytes"] * 1.1 + 512 * 2 ** 20  # KV cache, activations, runtime: a conservative margin
    verdict = "yes" if need <= ram * 0.9 else ("tight" if s["file_bytes"] <= ram else "no")
    out.print(f"file size     {hub.fmt_bytes(s['file_bytes'])}")
    out.print(f"fits in RAM   {verdict} ({hub.fmt_bytes(need)} needed of {hub.fmt_bytes(ram)}, from {source})")


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ---------------------------------------------------------------- rm

def rm(
    name: str = typer.Argument(..., help="Pulled model name: owner/repo:QUANT, or owner/repo for all its quants"),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation"),
) -> None:
    """Remove a pulled model's files from the Hugging Face cache (that repo's folder only)."""
    models = hub.find_local(name)
    if not models:
        hub.resolve_local(name)  # raises with close names and the pull hint
        raise MoecliError(f"{name}: not in the cache")
    size = sum(m.size for m in models)
    label = ", ".join(sorted({m.name for m in models}))
    if not yes:
        if not sys.stdin.isatty():
            raise MoecliError(f"not deleting {label} without confirmation: pass -y")
        if not typer.confirm(f"delete {label} ({hub.fmt_bytes(size)}) from {hub.cache_dir()}?", default=False):
            typer.echo("nothing deleted")
            return
    freed = hub.remove(models)
    typer.echo(f"removed {label} ({hub.fmt_bytes(freed)} freed)")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
    app.command("list")(list_models)
    app.command("show")(show)
    app.command("rm")(rm)
