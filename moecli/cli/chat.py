"""`moecli chat`: interactive chat, or one answer with -p."""
from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from moecli.resolve import PULL_HINT, resolve_model


def chat(
    model: Optional[str] = typer.Argument(None, help="GGUF file, model directory or pulled name (default: embedded SmolLM2)"),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Answer this prompt once and exit"),
    system: Optional[str] = typer.Option(None, "--system", help="System message"),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", min=1, help="Most tokens to generate per answer"),
    temperature: float = typer.Option(0.7, "--temperature", "--temp", min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(40, "--top-k", min=0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(0.05, "--min-p", min=0.0, max=1.0),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty", min=0.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    ctx: int = typer.Option(4096, "-c", "--ctx", min=16, help="Context length in tokens"),
    device: str = typer.Option("cpu", "--device", help="torch device for everything but CPU experts"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and rates"),
) -> None:
    """Chat with a model (the embedded SmolLM2-135M when none is given)."""
    import moecli

    path = resolve_model(model)
    if model is None:
        typer.echo(f"(embedded default model; for a real MoE: {PULL_HINT})", err=True)
    m = moecli.load(path, device=device, n_ctx=ctx)
    session = moecli.Session(m)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repeat_penalty=repeat_penalty, seed=seed)
    messages = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        messages.append({"role": "user", "content": text})
        ids = m.tokenize(m.chat_prompt(messages), add_special=True)
        t0, pieces, n = time.perf_counter(), [], 0
        t_first = None
        for piece in m.stream_text(_count(m.generate(ids, max_tokens, session=session, **sampling))):
            if t_first is None:
                t_first = time.perf_counter()
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        reply = "".join(pieces)
        messages.append({"role": "assistant", "content": reply})
        if verbose:
            t1 = time.perf_counter()
            n = _count.n
            pp = (t_first or t1) - t0
            typer.echo(f"prompt: {len(ids)} tokens, {len(ids) / pp:.1f} tok/s | "
                       f"generation: {n} tokens, {max(n - 1, 0) / max(t1 - (t_first or t1), 1e-9):.1f} tok/s",
                       err=True)
        return reply

    if prompt is not None:
        answer(prompt)
        return
    typer.echo("Type a message; /bye to quit.", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        if line.strip() in ("/bye", "/exit", "/quit"):
            break
        if line.strip():
            answer(line)


class _Counter:
    """Counts tokens passing through a generator (for --verbose)."""

    n = 0

    def __call__(self, it):
        self.n = 0
        for t in it:
            self.n += 1
            yield t


_count = _Counter()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
