"""`moecli serve`: the OpenAI- and ollama-compatible HTTP server (moecli/serve/), and `moecli ps`, which asks a
running one what it serves."""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from moecli.cli import options as opt
from moecli.errors import MoecliError
from moecli.resolve import PULL_HINT, resolve_model

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11434  # ollama's port: ollama clients find it unchanged


def default_address() -> tuple[str, int]:
    """MOECLI_HOST ("host", "host:port" or "http://host:port", as OLLAMA_HOST), else 127.0.0.1:11434."""
    value = os.environ.get("MOECLI_HOST", "").strip()
    if not value:
        return DEFAULT_HOST, DEFAULT_PORT
    value = value.split("://", 1)[-1].rstrip("/")
    host, sep, port = value.rpartition(":") if value.count(":") == 1 or value.startswith("[") else ("", "", "")
    if not sep:
        return value or DEFAULT_HOST, DEFAULT_PORT
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise MoecliError(f"MOECLI_HOST={os.environ['MOECLI_HOST']!r}: bad port {port!r}")
    return host.strip("[]") or DEFAULT_HOST, int(port)


DEFAULT_SLOT_CTX = 4096  # ollama's default num_ctx


def serve(
    model: Optional[str] = typer.Argument(
        None, help="GGUF file, model directory or pulled name (default: embedded SmolLM2)"),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1, or "
                                                            "MOECLI_HOST)"),
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535,
                                       help=f"Port (default {DEFAULT_PORT}, or MOECLI_HOST; 0: any free port)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOECLI_API_KEY", show_envvar=True,
                                          help="Require `Authorization: Bearer KEY` on every route"),
    parallel: int = typer.Option(4, "-np", "--parallel", min=1, max=64,
                                 help="KV slots: sequences generated at once; idle slots keep their conversation "
                                      "for prompt caching"),
    ctx: Optional[int] = opt.CTX,
    device: str = opt.DEVICE,
    n_gpu_layers: Optional[int] = opt.N_GPU_LAYERS,
    threads: Optional[int] = opt.THREADS,
    placement: Optional[str] = opt.PLACEMENT,
    cpu_moe: bool = opt.CPU_MOE,
    n_cpu_moe: Optional[int] = opt.N_CPU_MOE,
    expert_slots: Optional[int] = opt.EXPERT_SLOTS,
    flash_attn: bool = opt.FLASH_ATTN,
    temperature: float = typer.Option(0.8, "--temperature", "--temp", min=0.0,
                                      help="Default when a request gives none (0 = greedy)"),
    top_k: int = typer.Option(40, "--top-k", min=0, help="Default top-k (0 = all tokens)"),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Default top-p"),
    min_p: float = typer.Option(0.05, "--min-p", min=0.0, max=1.0, help="Default min-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", min=0.0, help="Default (1 = off)"),
    alias: Optional[str] = typer.Option(None, "--alias", help="Name the model is served under (default: the "
                                                              "pulled name or the file name)"),
    max_body: int = typer.Option(8, "--max-body-mb", min=1, max=1024, help="Largest request body, in MiB"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request (uvicorn's access log)"),
) -> None:
    """Serve a model over HTTP: OpenAI's API on /v1 (chat, completions, models) and ollama's on /api."""
    from moecli.runtime.sampling import SamplingParams
    from moecli.serve.app import build_app
    from moecli.serve.server import bind, is_loopback
    from moecli.serve.server import serve as run
    from moecli.serve.service import Service

    d_host, d_port = default_address()
    host = host or d_host
    port = d_port if port is None else port
    if not is_loopback(host) and not api_key:
        typer.echo(f"warning: listening on {host} without an API key: anyone who can reach this address can use "
                   "the model (set --api-key or MOECLI_API_KEY)", err=True)
    sock = bind(host, port)  # before the model loads: a busy port is an error at once
    path = resolve_model(model)
    if model is None:
        typer.echo(f"(embedded default model; for a real MoE: {PULL_HINT})", err=True)
    m = opt.load_model(path, ctx, device, threads, placement, expert_slots, flash_attn, n_gpu_layers=n_gpu_layers,
                       cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, model_name=model)
    # per slot: the -c asked for, else ollama's default context (4096) within what the model and memory allow
    ctx = ctx or min(m.n_ctx, DEFAULT_SLOT_CTX)
    name = alias or served_name(model, path)
    defaults = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repeat_penalty=repeat_penalty)
    svc = Service(m, name, parallel, ctx, defaults, aliases=(path.name, path.stem))
    svc.engine.pool.check_memory()
    app = build_app(svc, api_key=api_key, max_body=max_body * 1024 * 1024)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{_url_host(bound_host)}:{bound_port}"

    def ready():
        typer.echo(f"moecli serve: {name} on {url} (OpenAI API: {url}/v1, ollama API: {url}/api; {parallel} slots "
                   f"of {ctx} tokens){'; API key required' if api_key else ''}")
        sys.stdout.flush()

    run(app, svc.engine, sock, verbose=verbose, on_ready=ready)
    typer.echo("moecli serve: stopped", err=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def served_name(model: Optional[str], path) -> str:
    """A pulled name as given (owner/repo:QUANT), else the file's (or directory's) name without .gguf."""
    if model and not os.path.exists(os.path.expanduser(model)):
        return model
    return path.name.removesuffix(".gguf")


def ps(
    host: Optional[str] = typer.Option(None, "--host", help="Server address (default 127.0.0.1, or MOECLI_HOST)"),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help=f"Port (default {DEFAULT_PORT})"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOECLI_API_KEY", help="The server's key"),
    output: str = typer.Option("table", "-o", "--output", help="table or json"),
) -> None:
    """Show what a running `moecli serve` has loaded: size, where the experts run, cache hit rate, slots."""
    import json

    from moecli.serve.status import fetch_ps, render_ps

    d_host, d_port = default_address()
    data = fetch_ps(host or d_host, d_port if port is None else port, api_key)
    if output == "json":
        typer.echo(json.dumps(data, indent=2))
    elif output == "table":
        render_ps(data)
    else:
        raise MoecliError(f"bad output format {output!r}: use table or json")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("ps")(ps)
