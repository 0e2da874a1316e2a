"""What `moecli bench` prints, llama-bench style: each row as its test finishes (markdown, CSV or JSON lines), a
progress line on stderr while a test runs, then the summary lines and warnings.

Rows carry llama-bench's columns (model, size, params, engine, threads, test, t/s) and, for placements, the expert
cache's hit rate and the experts' CPU share. One file has one size and one parameter count in a run: the first
engine that loads it sets them (llama.cpp's own count leaves the metadata out). The expert kernel's figures have
their units in their own summary line: GB/s for decode (bytes of the experts read / time), GFLOP/s for prompts.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from typing import Callable

from moecli.chat.stats import dense_line

NOISE = 0.2  # a relative standard deviation above this gets a warning: the ratios are not to be trusted

MD_HEAD = ["model", "size", "params", "engine", "threads", "test", "t/s"]
PLACED_HEAD = ["hit %", "CPU %", "ms/layer", "model err %", "syncs/tok", "launches/tok", "CPU ms/layer",
               "CPU-only ms"]
# cpu_experts_ms: the CPU experts' ggml call per MoE layer as the executor ran it; cpu_only_experts_ms: the same
# calls through the same kernels alone, as CPU-only mode runs them (decode tests)
HYBRID_FIELDS = ("hit_rate", "cpu_share", "layer_ms", "cost_model_error", "syncs_per_token", "launches_per_token",
                 "decision_ms_per_layer", "cpu_experts_ms", "cpu_only_experts_ms")
CSV_FIELDS = ["model", "size", "params", "engine", "threads", "test", "tps", "tps_std", "n_prompt", "n_gen",
              "n_depth", *HYBRID_FIELDS, "experts_gbs", "experts_gflops"]


def fmt_bytes(b: int) -> str:
    for unit, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= s:
            return f"{b / s:.2f} {unit}"
    return f"{b} B"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def record(run: dict, r: dict) -> dict:
    """One test as llama-bench's JSON records name its fields, plus moecli's placement and kernel figures."""
    info = run.get("model_info") or {}
    n_prompt, n_gen = (r["n"], 0) if r["kind"] == "pp" else (0, r["n"])
    out = dict(model_filename=info.get("name", ""), model_size=run.get("file_bytes") or 0,
               model_n_params=info.get("params") or 0, engine=run["engine"], n_threads=run["threads"],
               n_prompt=n_prompt, n_gen=n_gen, n_depth=r["depth"], test=r["test"],
               avg_ns=int(r["ms"] * 1e6), stddev_ns=int(_std(r["samples_ms"]) * 1e6),
               avg_ts=r["tps"], stddev_ts=r["tps_std"],
               samples_ns=[int(x * 1e6) for x in r["samples_ms"]],
               samples_ts=[r["n"] / (x / 1e3) for x in r["samples_ms"] if x > 0])
    for k in HYBRID_FIELDS:
        if k in r:
            out[k] = r[k]
    if r["kind"] == "tg" and r.get("experts_gbs"):
        out["experts_gbs"] = r["experts_gbs"]
    if r["kind"] == "pp" and r.get("experts_gflops"):
        out["experts_gflops"] = r["experts_gflops"]
    return out


def _cell(rec: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return fmt.format(rec[key] * scale) if rec.get(key) is not None else "-"


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


class Report:
    """Rows as they come (`loaded`, `row`), then `finish`. fmt: md, csv, jsonl (rows) or json (one document)."""

    def __init__(self, fmt: str, placements: bool = False, out: Callable[[str], None] | None = None,
                 err: Callable[[str], None] | None = None, progress: bool = True):
        self.fmt, self.placements = fmt, placements
        self.out = out or (lambda line: print(line, flush=True))
        self.err = err or (lambda line: print(line, file=sys.stderr, flush=True))
        self.run: dict = {}
        self.sizes: dict[str, tuple[int, int]] = {}  # model file -> (bytes, params), the first engine's
        self.records: list[dict] = []
        self.noisy: list[str] = []
        self.started = False
        self._status = _Status() if progress else None

    # --- callbacks of bench.run's workers ----------------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        if "loaded" in event:
            run = dict(event["loaded"])
            name = (run.get("model_info") or {}).get("name", "")
            size, params = run.get("file_bytes"), (run.get("model_info") or {}).get("params")
            if name not in self.sizes and size:
                self.sizes[name] = (size, params or 0)
            self.run = run
        elif self._status is not None:
            self._status.show(f"{self.run.get('engine', '')} {event['test']}: "
                              + ("warm-up" if event["rep"] == 0 else f"repetition {event['rep']}/{event['reps']}"))

    def on_row(self, r: dict) -> None:
        if self._status is not None:
            self._status.stop()
        run = dict(self.run)
        name = (run.get("model_info") or {}).get("name", "")
        if name in self.sizes:  # one size per file
            run["file_bytes"], params = self.sizes[name]
            run["model_info"] = dict(run.get("model_info") or {}, params=params or run["model_info"].get("params"))
        rec = record(run, r)
        self.records.append(rec)
        if r["tps"] and r["tps_std"] / r["tps"] > NOISE:
            self.noisy.append(f"{r['test']} ({run['engine']}, {run['threads']} threads) ±"
                              f"{100 * r['tps_std'] / r['tps']:.0f} %")
        if self.fmt == "md":
            if not self.started:
                head = MD_HEAD + (PLACED_HEAD if self.placements else [])
                self.out("| " + " | ".join(head) + " |")
                self.out("| " + " | ".join("---" if h in ("model", "engine", "test") else "---:" for h in head) + " |")
            cells = [rec["model_filename"], fmt_bytes(rec["model_size"]), fmt_params(rec["model_n_params"]),
                     rec["engine"], str(rec["n_threads"]), rec["test"], f"{r['tps']:.2f} ± {r['tps_std']:.2f}"]
            if self.placements:
                cells += [_cell(rec, "hit_rate", "{:.1f}", 100), _cell(rec, "cpu_share", "{:.0f}", 100),
                          _cell(rec, "layer_ms", "{:.3f}"), _cell(rec, "cost_model_error", "{:+.0f}", 100),
                          _cell(rec, "syncs_per_token", "{:.1f}"), _cell(rec, "launches_per_token", "{:.1f}"),
                          _cell(rec, "cpu_experts_ms", "{:.3f}"), _cell(rec, "cpu_only_experts_ms", "{:.3f}")]
            self.out("| " + " | ".join(cells) + " |")
        elif self.fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
            if not self.started:
                w.writeheader()
            w.writerow({k: ("" if v is None else v) for k, v in _csv_row(rec).items()})
            self.out(buf.getvalue().rstrip("\n"))
        elif self.fmt == "jsonl":
            self.out(json.dumps(rec))
        self.started = True

    # --- the end ----------------------------------------------------------------------------------------------
    def finish(self, runs: list[dict], summaries: list[dict], ref_runs: list[dict], settings: dict) -> None:
        if self._status is not None:
            self._status.stop()
        if self.fmt == "json":
            out = dict(summaries[0])
            if len(summaries) > 1:
                out["runs"] = summaries
            out["settings"] = settings
            out["records"] = self.records
            self.out(json.dumps(out, indent=1))
        elif self.fmt == "md":
            for line in summary_lines(runs, summaries):
                self.out(line)
        for line in self.noise_warnings():
            self.err(line)

    def noise_warnings(self) -> list[str]:
        if not self.noisy:
            return []
        return [f"warning: large spread between repetitions: {', '.join(self.noisy)}: the host is busy or -r is "
                f"small; these numbers (and ratios) are not reliable"]


def _csv_row(rec: dict) -> dict:
    return dict(model=rec["model_filename"], size=rec["model_size"], params=rec["model_n_params"],
                engine=rec["engine"], threads=rec["n_threads"], test=rec["test"], tps=rec["avg_ts"],
                tps_std=rec["stddev_ts"], n_prompt=rec["n_prompt"], n_gen=rec["n_gen"], n_depth=rec["n_depth"],
                **{k: rec.get(k) for k in HYBRID_FIELDS}, experts_gbs=rec.get("experts_gbs"),
                experts_gflops=rec.get("experts_gflops"))


def summary_lines(runs: list[dict], summaries: list[dict]) -> list[str]:
    """After the table: ratios to llama.cpp, the expert kernel's figures (each with its unit), ggml's bound on
    prompts, and memory."""
    lines = [""]
    for run, s in zip(runs, summaries):
        who = f"{run['engine']}, {run['threads']} thread{'s' * (run['threads'] != 1)}"
        if s.get("ratio"):
            them = s.get("llama_cpp", {}).get("engine", "llama.cpp")
            lines.append(f"moecli ({who}) / {them}: " + ", ".join(f"{k.replace('_at_', ' @ ')} {v:.2f}x"
                                                                     for k, v in s["ratio"].items()))
            if s.get("ratio_cpu"):
                lines.append("  the same by CPU time (robust to a busy host; exact with 1 thread): " + ", ".join(
                    f"{k.replace('_at_', ' @ ')} {v:.2f}x" for k, v in s["ratio_cpu"].items()))
        kern = []
        for r in run["results"]:
            if r["kind"] == "tg" and r.get("experts_gbs"):
                kern.append(f"{r['test']} {r['experts_gbs']:.1f} GB/s")
            elif r["kind"] == "pp" and r.get("experts_gflops"):
                kern.append(f"{r['test']} {r['experts_gflops']:.1f} GFLOP/s")
        if kern:
            how = " (the same kernel probed alone)" if any(r.get("experts_source") for r in run["results"]) else ""
            lines.append(f"experts ({who}): {', '.join(kern)}{how}")
        for r in (x for x in run["results"] if "kernel_bound_tps" in x):
            k = f"experts {r['experts_gflops']:.0f}, " if r.get("experts_gflops") else ""
            lines.append(f"{r['test']}: {r['gflops']:.0f} GFLOP/s achieved; ggml's kernels bound it at "
                         f"{r['kernel_bound_tps']:.0f} t/s ({k}dense up to {r['dense_gflops']:.0f} GFLOP/s)")
        line = dense_line(run.get("model_info") or {})
        if line:
            lines.append(f"{line} ({who})")
    s = summaries[0]
    lines.append(f"moecli peak RSS {fmt_bytes(s['peak_rss_bytes'])} = {s['rss_ratio']:.2f}x "
                 f"(file {fmt_bytes(s['file_bytes'])} + KV {fmt_bytes(s['kv_bytes'])}); "
                 f"{s['rss_ratio_excl_runtime']:.2f}x without the Python/torch runtime "
                 f"({fmt_bytes(s['rss_before_load_bytes'])} before loading)")
    return lines


class _Status:
    """A transient line on stderr (a terminal only) saying which test and repetition runs now."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = None

    def show(self, text: str) -> None:
        if not self.console.is_terminal:
            return
        if self.live is None:
            self.live = self.console.status(text)
            self.live.start()
        else:
            self.live.update(text)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
