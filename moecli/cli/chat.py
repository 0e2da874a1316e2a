"""`moecli chat`: an interactive chat (slash commands, multi-line input, Ctrl-C stops an answer), or one answer
with -p (`-p -` reads the prompt from stdin). The REPL itself lives in moecli/chat/repl.py."""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

import typer

from moecli.cli import options as opt
from moecli.errors import MoecliError
from moecli.resolve import PULL_HINT


def chat(
    model: Optional[str] = typer.Argument(
        None, help="GGUF file, model directory or model name (owner/repo[:QUANT]: pulled first when not in the "
                   "cache; default: the embedded SmolLM2)"),
    prompt: Optional[str] = typer.Option(
        None, "-p", "--prompt", help="Answer this prompt once and exit ('-': read it from stdin)"),
    system: Optional[str] = typer.Option(None, "--system", "-sys", "--system-prompt", help="System message"),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", "--n-predict", min=1,
                                   help="Most tokens to generate per answer"),
    temperature: float = typer.Option(0.7, "--temperature", "--temp", min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(40, "--top-k", min=0, help="0 = all tokens"),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(0.05, "--min-p", min=0.0, max=1.0),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty", min=0.0, help="1 = off"),
    seed: Optional[int] = typer.Option(None, "-s", "--seed", help="Sampling seed (default: random)"),
    ctx: Optional[int] = opt.CTX,
    device: str = opt.DEVICE,
    n_gpu_layers: Optional[int] = opt.N_GPU_LAYERS,
    threads: Optional[int] = opt.THREADS,
    placement: Optional[str] = opt.PLACEMENT,
    cpu_moe: bool = opt.CPU_MOE,
    n_cpu_moe: Optional[int] = opt.N_CPU_MOE,
    expert_slots: Optional[int] = opt.EXPERT_SLOTS,
    record_trace: Optional[str] = typer.Option(
        None, "--record-trace", help="Write the routing of this chat (ids, weights, router scores, the executor's "
        "predictions) to FILE in moecli's trace format, for `moecli bench --simulate --trace FILE`"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and rates after each answer"),
    flash_attn: bool = opt.FLASH_ATTN,
    exact: bool = opt.EXACT,
) -> None:
    """Chat with a model (the embedded SmolLM2-135M when none is given). /? in the chat lists the commands."""
    from moecli.chat.repl import Settings
    from moecli.cli.pull import resolve_or_pull

    def say(line: str) -> None:
        typer.echo(line, err=True)

    if prompt == "-":
        prompt = read_stdin(say).rstrip("\n")
    if prompt is not None and not prompt.strip():
        raise MoecliError("empty prompt")
    # Flags are checked before anything is pulled: a wrong --device never waits for a download.
    placement = opt.placement_from_flags(placement, cpu_moe, n_cpu_moe)
    device = opt.device_from_flags(opt.exact_device(exact, device, n_gpu_layers), n_gpu_layers, say)
    if record_trace and placement is None:
        placement = "llama-cpp"  # recording lives in the executor; this placement keeps every expert on the CPU
    path = resolve_or_pull(model, say)
    if model is None:
        say(f"(embedded default model; for a real MoE: {PULL_HINT})")
    m = opt.load_model(path, ctx, device, threads, placement, expert_slots, flash_attn, model_name=model, say=say,
                       exact=exact)
    if verbose:
        from moecli.chat.stats import dense_line

        line = dense_line(_model_dense(m))
        if line:
            say(line)
    with m.record_trace(record_trace) if record_trace else contextlib.nullcontext():
        _chat(m, prompt, m.n_ctx, Settings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                           repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens,
                                           system=system, verbose=verbose))


def _model_dense(m) -> dict:
    from moecli.models.layers import dense_bytes

    dev, file = dense_bytes(m.transformer)
    return dict(dense_device_bytes=dev, dense_file_bytes=file)


def read_stdin(say) -> str:
    """The prompt from stdin as text: UTF-8, invalid bytes replaced (and said), as llama.cpp reads any bytes."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        say(f"warning: stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
            f"invalid bytes replaced with U+FFFD")
        return data.decode("utf-8", "replace")


def _chat(m, prompt, ctx, settings) -> None:
    from moecli.chat.repl import Chat, run

    c = Chat(m, settings, n_ctx=ctx)

    if prompt is not None:
        c.interactive = False
        status = c.answer(prompt)
        if status == "interrupted":
            raise KeyboardInterrupt
        if status == "full":
            raise MoecliError(c.context_full_message())
        return
    typer.echo('Type a message (/? for help, """ for multi-line, /bye or Ctrl-D to exit).', err=True)
    run(c)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
