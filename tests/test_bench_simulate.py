import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecli.bench.simulate import parse_ratios, run_sweep
from moecli.errors import MoecliError

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "mixtral-8x7b" / "gsm8k_2_routing.jsonl"
PROFILE = ROOT / "moecli" / "profiles" / "hybrimoe-testbed.toml"
needs_trace = pytest.mark.skipif(not TRACE.is_file(), reason="shared traces absent")


def test_parse_ratios():
    assert parse_ratios("0.25,0.5") == [0.25, 0.5]
    for bad in ("x", "1.5", "-0.1"):
        with pytest.raises(MoecliError):
            parse_ratios(bad)


@needs_trace
def test_sweep_structure_and_sanity():
    out = run_sweep(TRACE, PROFILE, "mixtral-8x7b", [0.25, 0.75], max_decode=20,
                    policies=["llama-cpp", "ktransformers", "hybrimoe", "oracle"])
    for r in ("0.25", "0.75"):
        row = out["results"][r]
        for p in ("llama-cpp", "ktransformers", "hybrimoe", "oracle"):
            assert {"tbt_ms", "ttft_ms", "hit_rate", "copied_bytes"} <= set(row[p])
        assert row["llama-cpp"]["hit_rate"] == 0 and row["llama-cpp"]["cpu_share"] == 1
        assert row["hybrimoe"]["ttft_ms"] < row["ktransformers"]["ttft_ms"]
    # More cache, faster decode.
    assert out["results"]["0.75"]["ktransformers"]["tbt_ms"] < out["results"]["0.25"]["ktransformers"]["tbt_ms"]
    json.dumps(out)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moecli", "bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@needs_trace
def test_cli_json_and_errors():
    r = _cli("--simulate", "--trace", str(TRACE), "--profile", str(PROFILE), "--model-geometry", "mixtral-8x7b",
             "--cache-ratio", "0.5", "--policies", "llama-cpp,hybrimoe", "-o", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["results"]["0.5"]["hybrimoe"]["tbt_ms"] > 0
    for args in (["--trace", "missing.jsonl"], ["--model-geometry", "nope"], ["--cache-ratio", "2"]):
        base = {"--trace": str(TRACE), "--model-geometry": "mixtral-8x7b", "--cache-ratio": "0.5"}
        base[args[0]] = args[1]
        flat = [x for kv in base.items() for x in kv]
        r = _cli("--simulate", "--profile", str(PROFILE), *flat)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = _cli("-r", "0")  # the real benchmark refuses a bad repetition count before loading anything
    assert r.returncode == 1 and r.stderr.startswith("error: ")


# --- what a user looks at: tables within 80 columns, markdown, CSV, pictures, the trace's reach ----------------------
def tiny_trace(path: Path, layers=(0, 1), n_experts=8, top_k=2, decode=24, seed=0) -> Path:
    """A moecli-format trace (what `chat --record-trace` writes) of a few MoE layers: a 6-token prompt, then decode."""
    import random

    rng = random.Random(seed)
    lines = [json.dumps({"format": "moecli-trace", "version": 1, "model": "tiny", "n_experts": n_experts,
                         "top_k": top_k, "layers": list(layers)})]
    for p in range(decode + 1):
        tokens = 6 if p == 0 else 1
        for l in layers:
            ids = [rng.sample(range(n_experts), top_k) for _ in range(tokens)]
            lines.append(json.dumps({"seq": 0, "pass": p, "kind": "prefill" if p == 0 else "decode", "layer": l,
                                     "ids": ids, "weights": [[1.0 / top_k] * top_k for _ in ids]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _sim(tmp_path, *args, env=None):
    e = dict(os.environ, MOECLI_TRACES=str(tmp_path / "traces"), COLUMNS="80", **(env or {}))
    return subprocess.run([sys.executable, "-m", "moecli", "bench", "--simulate", "--model-geometry",
                           "mixtral-8x7b", "--cache-ratio", "0.25,0.5,0.75", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env=e)  # cwd: nothing depends on the current directory


def test_simulate_outputs_a_user_reads(tmp_path):
    trace = tiny_trace(tmp_path / "t.jsonl")
    base = ["--trace", str(trace), "--profile", "hybrimoe-testbed"]  # a shipped profile, by name
    r = _sim(tmp_path, *base)
    assert r.returncode == 0, r.stderr
    assert max(len(l) for l in r.stdout.splitlines()) <= 80, r.stdout
    assert "hybrimoe-prefetch" in r.stdout and "TBT ms" in r.stdout and "TTFT ms" in r.stdout
    # The trace covers 2 of Mixtral's 32 layers: said once, as a warning, not silently "predicted".
    warn = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "covers 2 of the 32 MoE layers" in warn[0], r.stderr

    md = _sim(tmp_path, *base, "-o", "md", "--policies", "lru,hybrimoe,oracle")
    assert md.returncode == 0, md.stderr
    table = [l for l in md.stdout.splitlines() if l.startswith("|")]
    assert table[0].startswith("| cache ratio | policy | TBT ms") and set(table[1]) <= set("|-: ")
    assert len(table) == 2 + 3 * 3 and all(l.count("|") == table[0].count("|") for l in table)
    assert "┃" not in md.stdout and "━" not in md.stdout  # markdown, not a box table

    c = _sim(tmp_path, *base, "-o", "csv", "--policies", "lru,hybrimoe,oracle")
    assert c.returncode == 0, c.stderr
    import csv

    rows = list(csv.DictReader(c.stdout.splitlines()))
    assert len(rows) == 9 and {r["policy"] for r in rows} == {"lru", "hybrimoe", "oracle"}
    assert all(float(r["tbt_ms"]) > 0 for r in rows)


def test_simulate_plots(tmp_path):
    trace = tiny_trace(tmp_path / "t.jsonl")
    base = ["--trace", str(trace), "--profile", "hybrimoe-testbed", "--policies", "llama-cpp,lru,hybrimoe,oracle"]
    png = tmp_path / "out" / "sweep.png"
    r = _sim(tmp_path, *base, "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(png).shape[:2]
    assert w > 1000 and h > 400  # two panels side by side
    r = _sim(tmp_path, *base, "--plot", "-")
    assert r.returncode == 0, r.stderr
    assert "TBT ms (decode, per token)" in r.stdout and "TTFT ms (prefill)" in r.stdout
    assert "oracle" in r.stdout and "hybrimoe" in r.stdout and "\x1b[" not in r.stdout
    bad = _sim(tmp_path, *base, "--plot", "sweep.jpg")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and ".png" in bad.stderr


def test_simulate_finds_traces_and_profiles_by_name(tmp_path):
    r = _sim(tmp_path, "--profile", "hybrimoe-testbed")  # no --trace and none recorded yet: how to record one
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--record-trace" in r.stderr and str(tmp_path / "traces") in r.stderr
    tiny_trace((tmp_path / "traces").mkdir() or tmp_path / "traces" / "mine.jsonl")
    r = _sim(tmp_path, "--profile", "hybrimoe-testbed", "--policies", "lru", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trace"].endswith("mine.jsonl") and "mine.jsonl" in r.stderr
    r = _sim(tmp_path, "--profile", "no-such-host")
    assert r.returncode == 1 and "hybrimoe-testbed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
