"""`moecli profile`: probes, the cost fit, the profile file, the placement plan, the CLI (short measurements)."""
import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import tiny_gguf
from moecli.errors import MoecliError
from moecli.policy.cost import build_cost_model, load_profile
from moecli.policy.geometry import get_geometry
from moecli.profile import microbench as M
from moecli.profile import plan as P
from moecli.profile import probe, store
from moecli.profile.probe import GpuInfo

SHORT = dict(tokens=(1, 4, 16), multi=(1, 2, 4), error_tokens=(3, 8), reps=3, point_budget_s=0.01)


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "moecli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe():
    return tiny_gguf("qwen3moe", "F32")


@pytest.fixture(scope="module")
def small_layer():
    # Small enough to measure in a second; Q8_0 rows of 256 so quantizing is instant.
    return M.synthetic_layer("Q8_0", hidden=256, ffn=256, n_expert=16, top_k=4)


@pytest.fixture(scope="module")
def short_meas(small_layer):
    return M.run([small_layer], threads=1, thread_counts=[1], mem_bytes=16 << 20, gpu=False, **SHORT)


@pytest.fixture
def profiles_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv("MOECLI_PROFILES", str(d))
    monkeypatch.chdir(tmp_path)  # ./profiles is searched too: keep the repo's out of it
    return d


# -- probe ---------------------------------------------------------------------------------------------------------


def test_probe_sane():
    h = probe.probe()
    assert h.hostname
    assert 1 <= h.cpu.physical_cores <= h.cpu.logical_cores
    assert h.cpu.model
    assert all(isinstance(x, str) for x in h.cpu.isa)
    assert 0 < h.ram_available_bytes <= h.ram_total_bytes
    assert all(n.node >= 0 for n in h.numa)
    import torch

    assert (len(h.gpus) > 0) == torch.cuda.is_available()
    for g in h.gpus:
        assert 0 < g.free_bytes <= g.total_bytes


# -- fitting -------------------------------------------------------------------------------------------------------


def test_fit_recovers_known_line():
    n = np.array([1, 2, 4, 8, 16, 64, 256])
    a, b = M.fit_linear(n, 0.03 * n + 0.2)
    assert a == pytest.approx(0.03, rel=1e-9) and b == pytest.approx(0.2, rel=1e-9)
    # joint fit with noise: first + a·tokens + b·experts
    rng = np.random.default_rng(1)
    pts = [(m, t, (0.05 + 0.03 * t + 0.2 * m) * (1 + 0.02 * rng.standard_normal()))
           for m, t in [(1, 1), (1, 2), (1, 4), (1, 16), (1, 64), (2, 2), (4, 4), (8, 8), (8, 16), (30, 64)]]
    a, b, first = M.fit_cost(pts)
    assert a == pytest.approx(0.03, rel=0.1) and b == pytest.approx(0.2, rel=0.1)
    assert first == pytest.approx(0.05, abs=0.03)


def test_measured_fit_recovers_points_and_is_monotonic(short_meas):
    f = short_meas.cpu[0]
    assert f.a_ms > 0 and f.b_ms >= 0 and f.first_ms >= 0  # a tiny expert can be all per-token cost
    # the fit reproduces the points it was made from (these are real, noisy measurements: loose tolerance)
    single = [(n, t) for m, n, t in f.points if m == 1]
    pred = [f.first_ms + f.expert_ms(n) for n, _ in single]
    meas = [t for _, t in single]
    assert np.median(np.abs(np.array(pred) / np.array(meas) - 1)) < 0.6
    ns = [1, 2, 4, 8, 16, 64, 256]
    assert all(x < y for x, y in zip([f.expert_ms(n) for n in ns], [f.expert_ms(n) for n in ns][1:]))
    assert [e["tokens"] for e in f.errors] == [3, 8] and f.fit_error_pct is not None
    assert np.isfinite(f.fit_error_pct) and short_meas.mem_bandwidth_gbs > 0


# -- the profile file ------------------------------------------------------------------------------------------------


def test_toml_round_trips_through_load_profile_and_cost_model(short_meas, tmp_path):
    host = probe.probe()
    fit = short_meas.cpu[0]
    # present the small layer's fit as the qwen3 geometry's, so build_cost_model must pick the measured a, b
    fit.model, fit.quant = "qwen3-30b-a3b", "Q8_0"
    path = store.write_profile(store.build_document(host, short_meas), tmp_path / "h.toml")
    raw = tomllib.loads(path.read_text())
    assert raw["host"]["hostname"] == host.hostname and raw["host"]["ram_gb"] > 0
    assert raw["cpu"]["fit"][0]["a_ms"] == pytest.approx(fit.a_ms, rel=1e-5)
    assert raw["cpu"]["fit"][0]["points"][0][:2] == [1.0, 1.0]
    hp = load_profile(path)
    cm = build_cost_model(hp, get_geometry("qwen3-30b-a3b"), "Q8_0")
    assert cm.cpu_a == pytest.approx(fit.a_ms, rel=1e-5) and cm.cpu_b == pytest.approx(fit.b_ms, rel=1e-5)
    # the cost model follows the measured two-piece fit when the profile has one (the single line misses ~25 %)
    assert cm.cpu_first == pytest.approx(fit.pieces_first_ms if fit.pieces else fit.first_ms, rel=1e-5)
    for n in (1, 3, 16, 100):
        assert cm.cpu(n) == pytest.approx(fit.expert_ms(n, piecewise=True), rel=1e-5)
    # a quant without a fit still gets derived costs from the [cpu] rates
    assert build_cost_model(hp, get_geometry("mixtral-8x7b"), "Q4_K").cpu_b > 0


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    store.write_atomic(path, 'a = 1\n')
    with pytest.raises(MoecliError):
        store.write_profile({"host": {"bad": object()}}, path)  # unserializable: fails before touching the disk
    with pytest.raises(tomllib.TOMLDecodeError):
        store.write_atomic(path, "a = [unclosed\n")

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.write_atomic(path, "a = 2\n")
    assert path.read_text() == "a = 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.toml"]  # no temp file left behind


def test_find_profile_prefers_this_hosts_model_profile(profiles_dir, monkeypatch):
    monkeypatch.setattr(store, "host_name", lambda: "box")
    assert store.find_profile() is None and store.find_profile("m.gguf") is None
    assert "moecli profile" in store.no_profile_message() and len(store.no_profile_message().splitlines()) == 1
    profiles_dir.mkdir()
    (profiles_dir / "otherhost.toml").write_text("")
    generic = profiles_dir / "box.toml"
    generic.write_text("")
    assert store.find_profile("m.gguf") == generic
    specific = profiles_dir / "box-qwen3-q4_k_m.toml"
    specific.write_text("")
    assert store.find_profile("/x/Qwen3-Q4_K_M.gguf") == specific
    assert store.find_profile("another") == generic
    assert store.default_path("Qwen3-Q4_K_M.gguf") == specific


# -- the plan ------------------------------------------------------------------------------------------------------

QWEN3 = get_geometry("qwen3-30b-a3b")
EXPERT_Q4K = 3 * 2048 * 768 * 9 // 16            # 2,654,208 bytes at 4.5 bits
DEQ = 3 * 2048 * 768 * 4                         # one expert in float32: 18,874,368
DENSE_PARAMS = 48 * (2048 * 128 * 72 + 2048 * 128) + 151936 * 2048  # attention+router x 48 + head
DENSE = DENSE_PARAMS * 9 // 16                   # on the device as stored: 4.5 bits (the Triton kernels read them)
KV = 48 * 2 * 4 * 128 * 4096 * 2                 # 48 layers, K+V, 4 kv heads of 128, ctx 4096, f16


def test_slots_24gb_gpu_hand_computed():
    facts = P.ModelFacts.from_geometry(QWEN3, "Q4_K")
    assert facts.expert_bytes == EXPERT_Q4K and facts.dense_params == DENSE_PARAMS
    gpu = GpuInfo(0, "24 GB card", total_bytes=24_000_000_000, free_bytes=23_000_000_000)
    p = P.make_plan(facts, gpu, 4096, 8)
    margin = int(0.05 * 24e9) + DEQ               # 5 % of 24 GB beats the 512 MiB floor
    budget = 23_000_000_000 - DENSE - KV - margin
    assert p.expert_budget == budget == 20_686_756_352
    assert budget // (48 * EXPERT_Q4K) - 1 == 161 and p.slots_per_layer == 128  # every expert fits, as in llama.cpp
    # llama.cpp: quantized dense (4.5 bits), F16 KV: 60 layers' worth of room > 48 -> nothing on the CPU
    assert p.llama_n_cpu_moe == 0 and p.llama_flags.startswith("-ngl 999") and p.llama_ot == ""


def test_slots_8gb_gpu_and_llama_flags():
    facts = P.ModelFacts.from_geometry(QWEN3, "Q4_K")
    p = P.make_plan(facts, GpuInfo(0, "8 GB card", 8_000_000_000, 7_500_000_000), 4096, 8)
    budget = 7_500_000_000 - DENSE - KV - (512 << 20) - DEQ   # the 512 MiB floor beats 5 % of 8 GB
    assert p.slots_per_layer == budget // (48 * EXPERT_Q4K) - 1 == 44
    llama_budget = 7_500_000_000 - DENSE - KV - (512 << 20)   # the same dense bytes and f16 KV
    gpu_layers = llama_budget // (128 * EXPERT_Q4K)             # 17 whole layers fit
    assert p.llama_n_cpu_moe == 48 - gpu_layers == 31
    assert p.llama_flags == "-ngl 999 --n-cpu-moe 31"
    assert p.llama_ot == r'-ot "blk\.(' + "|".join(map(str, range(31))) + r')\.ffn_(up|down|gate)_exps=CPU"'


def test_no_gpu_plan_puts_everything_on_cpu():
    facts = P.ModelFacts.from_geometry(QWEN3, "Q4_K")
    p = P.make_plan(facts, None, 4096, 2, costs=build_cost_model(store.safe_default_profile(), QWEN3, "Q4_K"))
    assert p.slots_per_layer == 0 and p.device == "cpu" and not p.on_device
    assert "--cpu-moe" not in p.llama_flags and "no GPU" in p.llama_flags and not p.llama_ot  # nothing to offload
    assert p.decode_tok_s and p.decode_tok_s > 0


def test_dense_and_kv_do_not_fit():
    facts = P.ModelFacts.from_geometry(QWEN3, "Q4_K")
    p = P.make_plan(facts, GpuInfo(0, "small", 1_000_000_000, 800_000_000), 4096, 2)
    assert not p.fits and p.slots_per_layer == 0 and "smaller --ctx" in p.on_cpu[0]
    with pytest.raises(MoecliError):
        P.make_plan(facts, None, 0, 2)


# -- the command ---------------------------------------------------------------------------------------------------


def test_estimate_only_prints_plan_and_llama_flags(tiny_moe, tmp_path):
    env = {"MOECLI_PROFILES": str(tmp_path / "none")}
    r = run_cli("profile", tiny_moe, "--estimate-only", "--ctx", 256, env=env)
    assert r.returncode == 0, r.stderr
    assert "plan" in r.stdout and "llama.cpp:" in r.stdout and "expert slots per layer" in r.stdout
    assert "no profile: run `moecli profile`" in r.stdout  # the estimate used safe defaults
    assert "not written" in r.stdout and not (tmp_path / "none").exists()
    r = run_cli("profile", tiny_moe, "--estimate-only", "--json", env=env)
    d = json.loads(r.stdout)
    assert d["profile"] is None and d["plan"]["n_expert"] == 8 and d["plan"]["llama_flags"]


def test_profile_measures_tiny_model_and_writes(tiny_moe, tmp_path):
    out = tmp_path / "p" / "tiny.toml"
    r = run_cli("profile", tiny_moe, "--threads", 1, "-o", out, env={"MOECLI_PROFILES": str(tmp_path / "none")})
    assert r.returncode == 0, r.stderr
    assert "fit error" in r.stdout and str(out) in r.stdout
    raw = tomllib.loads(out.read_text())
    assert raw["cpu"]["fit"][0]["model"] == tiny_moe.stem.lower() and raw["cpu"]["fit"][0]["quant"] == "F32"
    assert raw["cpu"]["threads"] == 1
    load_profile(out)


@pytest.mark.parametrize("args,msg", [(["--ctx", "0"], "--ctx"), (["nope.gguf"], "no such file"),
                                      (["--threads", "-2"], "--threads")])
def test_bad_input_is_one_line(args, msg):
    r = run_cli("profile", *args, "--estimate-only")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], r.stderr


# -- habits: progress, warnings, consistent threads, limits, per-user files --------------------------------------


def test_run_reports_progress_over_every_timed_point(small_layer):
    seen = []
    M.run([small_layer], threads=1, thread_counts=[1], mem_bytes=8 << 20, gpu=False,
          progress=lambda step, done, total: seen.append((step, done, total)), **SHORT)
    total = seen[-1][2]
    assert total == M.cpu_points(SHORT["tokens"], SHORT["multi"], SHORT["error_tokens"]) + 1  # + the bandwidth
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen) and seen[-1][1] == total
    assert {s for s, _, _ in seen} == {"CPU experts Q8_0, 1 thread", "memory bandwidth, 1 thread"}


def test_fit_warning_only_when_the_fit_is_off(short_meas):
    from moecli.cli.profile import FIT_WARN_PCT, fit_warnings

    f = short_meas.runtime_fits()[0]
    good = dict(f.errors[0], error=0.05, error_piecewise=0.05)
    f.errors = [good]
    assert fit_warnings(short_meas) == []
    f.errors = [dict(good, error=0.6, error_piecewise=0.9)]  # the two-piece fit is what the cost model uses
    (line,) = fit_warnings(short_meas)
    assert line.startswith("warning:") and "off by 90 %" in line and FIT_WARN_PCT < 90


def test_profile_cli_progress_threads_and_warnings(tiny_moe, tmp_path):
    """Through a terminal: a progress bar while measuring; one thread count throughout; no --cpu-moe advice
    without a GPU; the profile lands in the per-user directory whatever the current directory is."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, MOECLI_PROFILES=str(tmp_path / "mine"), TERM="xterm")
    env.pop("COLUMNS", None)
    c = pexpect.spawn(sys.executable, ["-m", "moecli", "profile", str(tiny_moe), "-t", "1"], env=env,
                      encoding="utf-8", timeout=180, dimensions=(40, 160), cwd=str(tmp_path))
    c.expect("measuring CPU experts F32, 1 thread")  # the bar's description
    c.expect(r"\d+%")
    c.expect(pexpect.EOF)
    out = c.before
    assert "profile written: " + str(tmp_path / "mine") in out and not (tmp_path / "profiles").exists()
    assert "1 thread on the CPU" in out and "the runtime will use 1 thread" in out and "2 threads" not in out
    assert "--cpu-moe" not in out and "nothing to offload" in out
    assert list((tmp_path / "mine").glob("*.toml"))


def test_profile_context_is_checked(tiny_moe):
    r = run_cli("profile", "--estimate-only", "--ctx", 100_000_000)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: --ctx 100000000: ") and "TiB of KV cache" in r.stderr
    r = run_cli("profile", tiny_moe, "--estimate-only", "--ctx", 4096)
    assert r.returncode == 0 and "warning: --ctx 4096 is beyond the model's trained context of 2048" in r.stderr
    assert "at ctx 4096" in r.stdout
    r = run_cli("profile", tiny_moe, "--estimate-only")  # default: the trained length, as chat's
    assert r.returncode == 0 and "at ctx 2048" in r.stdout and "warning" not in r.stderr


def test_device_expert_is_measured_through_the_executors_grouped_kernels(small_layer, monkeypatch):
    """`profile` times the device expert as the executor runs it (DeviceExpertCache.run -> grouped_experts), here on
    the CPU device through Triton's interpreter: every timed call goes through the grouped kernels."""
    from moecli.kernels import device_ops

    calls = []
    real = device_ops.grouped_experts

    def counted(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)
    monkeypatch.setattr(device_ops, "grouped_experts", counted)
    fit = M.measure_gpu_expert(small_layer, tokens=(1, 3), reps=2, device="cpu")
    assert [n for n, _ in fit.points] == [1, 3] and all(ms > 0 for _, ms in fit.points)
    assert fit.g0_ms >= 0 and fit.g1_ms >= 0 and fit.dtype == "float32"
    if device_ops.use_triton("cpu"):
        assert calls == [1] * 4 + [3] * 4  # 2 warm-up + 2 timed calls per token count, each one grouped call
