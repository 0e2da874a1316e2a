import json
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
