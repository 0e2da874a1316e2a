"""`moecli bench --serve`: a small load generator against `moecli serve` and, on the same GGUF in the same run,
llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`, which serves one request at a time: it has no
parallel slots; `--interrupt_requests False` makes it queue the others instead of cutting the running one off).

Throughput: for each concurrency C, C client threads each send `requests` streaming /v1/completions requests one
after the other (distinct prompts, greedy, end-of-generation tokens banned through logit_bias so every request makes
exactly `n_gen` tokens); aggregate tokens/s = all generated tokens / wall time; "moecli batch" is the mean number
of streams moecli decoded per forward pass during the row (continuous batching; from /api/ps). Time to first token:
one client, a fresh `n_prompt`-token prompt (nothing cached), then the same prompt extended by a few words (its
prefix cached).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from moecli.errors import MoecliError

WORDS = ("river mountain star sea cloud forest stone light wind fire music garden city bridge road book paper "
         "window door table").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1:port, ready once GET /v1/models answers; stopped with SIGTERM."""

    def __init__(self, argv: list[str], port: int, env: dict | None = None, timeout: float = 300.0, log=None):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
                                     env=dict(os.environ, **(env or {})))
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MoecliError(f"{' '.join(argv[:4])}... exited with status {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise MoecliError(f"{' '.join(argv[:4])}... did not start within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Sample:
    ttft: float
    tokens: int
    seconds: float


@dataclass
class Row:
    server: str
    streams: int
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    batch: float | None = None  # moecli: streams decoded per forward pass during this row (continuous batching)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _prompt(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n_words))


def stream_completion(url: str, prompt: str, n_gen: int, bias: dict) -> Sample:
    """One streaming /v1/completions request: time to its first token, tokens generated, total time."""
    import httpx

    body = {"prompt": prompt, "max_tokens": n_gen, "temperature": 0, "stream": True, "logit_bias": bias,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, finish, usage = None, 0, None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise MoecliError(f"{url}: HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise MoecliError(f"{url}: {data['error']}")
            choices = data.get("choices") or []
            if choices and choices[0].get("finish_reason") is None:
                tokens += 1
                first = first or time.perf_counter()
            elif choices:
                finish = choices[0]["finish_reason"]
            usage = data.get("usage") or usage
    end = time.perf_counter()
    if usage:  # the server's count (a chunk may carry no token, or a held-back character)
        tokens = usage["completion_tokens"]
    elif finish == "length":
        tokens = n_gen
    return Sample((first or end) - t0, tokens, end - t0)


def load(url: str, name: str, streams: int, requests: int, n_words: int, n_gen: int, bias: dict) -> Row:
    samples: list[Sample] = []
    errors: list[Exception] = []

    def client(c: int):
        for k in range(requests):
            try:
                samples.append(stream_completion(url, _prompt(1000 + c * requests + k, n_words), n_gen, bias))
            except Exception as e:  # noqa: BLE001 - reported after the others finish
                errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise MoecliError(f"{name}: {errors[0]}")
    return Row(name, streams, sum(s.tokens for s in samples), wall, [s.ttft for s in samples])


def decode_counters(url: str) -> tuple[int, int] | None:
    """moecli serve's (decode tokens, decode forward passes) so far, from /api/ps; None from other servers."""
    import httpx

    try:
        server = httpx.get(url + "/api/ps", timeout=10).json()["models"][0]["server"]
        return server["decode_tokens"], server["decode_forwards"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError):
        return None


def ttft(url: str, n_words: int, bias: dict, reps: int) -> tuple[float, float]:
    """Median time to first token: fresh prompts (nothing cached), and the same prompts extended (prefix cached)."""
    cold, warm = [], []
    for r in range(reps):
        p = _prompt(5000 + r, n_words)
        cold.append(stream_completion(url, p, 1, bias).ttft)
        warm.append(stream_completion(url, p + " and then the sea", 1, bias).ttft)
    return statistics.median(cold), statistics.median(warm)


def eog_bias(path: Path) -> dict:
    """logit_bias banning every end-of-generation token of the GGUF's vocabulary."""
    from moecli.formats.gguf import GGUFFile
    from moecli.tokenizer import GGUFTokenizer

    tok = GGUFTokenizer(GGUFFile(path))
    return {str(t): -100 for t in range(tok.n_vocab) if tok.is_eog(t)}


def run(path: Path, streams: list[int], requests: int, n_prompt: int, n_gen: int, threads: int | None,
        ctx: int, vs_llama_cpp: bool, ttft_reps: int, echo) -> dict:
    bias = eog_bias(path)
    n_words = max(1, n_prompt // 2)  # about two tokens per word with these words and a real tokenizer
    t = ["-t", str(threads)] if threads else []
    servers = [("moecli", [sys.executable, "-m", "moecli", "serve", str(path), "--host", "127.0.0.1", "--port",
                           "{port}", "-np", str(max(streams)), "-c", str(ctx), *t])]
    if vs_llama_cpp:
        servers.append(("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
                                             "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", str(ctx),
                                             "--n_threads", str(threads or os.cpu_count() or 1),
                                             "--n_threads_batch", str(threads or os.cpu_count() or 1),
                                             "--interrupt_requests", "False"]))  # queue, do not cut off
    rows, ttfts = [], {}
    for name, argv in servers:
        port = free_port()
        echo(f"starting {name}...")
        srv = ServerProcess([a.replace("{port}", str(port)) for a in argv], port)
        try:
            stream_completion(srv.url, _prompt(0, n_words), 4, bias)  # warm-up
            for c in streams:
                before = decode_counters(srv.url)
                row = load(srv.url, name, c, requests, n_words, n_gen, bias)
                after = decode_counters(srv.url)
                if before and after and after[1] > before[1]:
                    row.batch = (after[0] - before[0]) / (after[1] - before[1])
                echo(f"{name}: {c} stream{'s' if c > 1 else ''}: {row.tok_s:.1f} tok/s")
                rows.append(row)
            ttfts[name] = ttft(srv.url, n_words, bias, ttft_reps)
        finally:
            srv.stop()
    return {"rows": rows, "ttft": ttfts, "settings": {"model": str(path), "n_gen": n_gen, "n_prompt_words": n_words,
                                                       "requests_per_stream": requests, "ctx": ctx,
                                                       "threads": threads}}


def render(result: dict) -> str:
    rows, ttfts = result["rows"], result["ttft"]
    names = list(dict.fromkeys(r.server for r in rows))
    by = {(r.server, r.streams): r for r in rows}
    batched = any(r.batch for r in rows)
    head = ["streams"] + [f"{n} tok/s" for n in names] + (["ratio"] if len(names) > 1 else []) + \
        (["moecli batch"] if batched else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted({r.streams for r in rows}):
        vals = [by[(n, c)].tok_s for n in names]
        cells = [str(c)] + [f"{v:.1f}" for v in vals]
        if len(names) > 1:
            cells.append(f"{vals[0] / vals[1]:.2f}x" if vals[1] else "-")
        if batched:
            b = by[(names[0], c)].batch
            cells.append(f"{b:.1f}" if b else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| server | TTFT fresh prompt | TTFT cached prefix |", "|---|---|---|"]
    for n in names:
        cold, warm = ttfts[n]
        lines.append(f"| {n} | {cold * 1000:.0f} ms | {warm * 1000:.0f} ms |")
    return "\n".join(lines)


def as_json(result: dict) -> dict:
    return {"rows": [{"server": r.server, "streams": r.streams, "tokens": r.tokens, "seconds": r.seconds,
                      "tok_s": r.tok_s, "decode_batch": r.batch, "ttft_median_s": statistics.median(r.ttft) if r.ttft else None}
                     for r in result["rows"]],
            "ttft": {k: {"fresh_s": v[0], "cached_prefix_s": v[1]} for k, v in result["ttft"].items()},
            "settings": result["settings"]}


def main(model, streams: str, requests: int, n_prompt: int, n_gen: int, threads, ctx: int, vs_llama_cpp: bool,
         reps: int, output: str, echo) -> str:
    """The `bench --serve` command: resolve the model, run, render (md or json)."""
    from moecli.resolve import resolve_model

    try:
        counts = sorted({int(x) for x in streams.split(",") if x.strip()})
    except ValueError:
        raise MoecliError(f"--streams {streams!r}: comma-separated counts, e.g. 1,2,4,8") from None
    if not counts or counts[0] < 1 or counts[-1] > 64:
        raise MoecliError("--streams: counts between 1 and 64")
    if requests < 1 or n_gen < 1:
        raise MoecliError("--requests and -n must be at least 1")
    path = Path(resolve_model(model))
    if path.is_dir() and vs_llama_cpp:
        raise MoecliError("--vs-llama-cpp needs a GGUF file")
    if vs_llama_cpp:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as e:
            raise MoecliError(f"llama_cpp.server needs its extras ({e.name} is missing): pip install "
                              "pydantic-settings 'starlette-context<0.4' PyYAML") from None
    result = run(path, counts, requests, n_prompt, n_gen, threads, ctx, vs_llama_cpp, reps, echo)
    return json.dumps(as_json(result), indent=1) if output == "json" else render(result)
