"""The device kernels wired in: dense weights stay in their file bytes on the device, the hybrid executor's device
experts compute through the grouped kernel only, the f16 KV cache, the torch fallback, and `bench --kernels`."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import moecli
from conftest import tiny_gguf
from moecli.kernels import device_ops as D
from moecli.kernels import torch_dequant
from moecli.models.layers import TorchLinear, dense_bytes

pytest.importorskip("triton")
if not D.use_triton("cpu"):
    pytest.skip("Triton's interpreter is not enabled (TRITON_INTERPRET=1)", allow_module_level=True)

TEXT = "The quick brown fox jumps over the lazy dog."


def test_dense_weights_stay_quantized_and_match_ggml():
    m = moecli.load(tiny_gguf("qwen3moe", "Q4_K_M"), engine="torch")
    dev, file = dense_bytes(m.transformer)
    assert file > 0 and dev <= 1.1 * file
    t = m.checkpoint.tensor("blk.0.attn_q.weight")
    lin = TorchLinear(t, "cpu")
    assert lin.qweight is not None and lin.qweight.type == t.type and lin.device_bytes == t.nbytes
    x = torch.randn(3, t.ne[0])
    ref = x.double() @ torch.from_numpy(t.numpy()).double().T
    assert (lin(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_hybrid_device_experts_compute_only_through_the_grouped_kernel(monkeypatch):
    path = tiny_gguf("qwen3moe", "Q4_K")
    ids = moecli.load(path, engine="torch").tokenize(TEXT)
    ref = moecli.load(path, engine="torch").logits(ids)
    calls = []
    real = D.grouped_experts
    monkeypatch.setattr(D, "grouped_experts", lambda *a, **k: calls.append(1) or real(*a, **k))

    def no_dequant(*a, **k):
        raise AssertionError("a device expert was dequantized by torch")

    monkeypatch.setattr(torch_dequant, "dequantize", no_dequant)
    m = moecli.load(path, placement="n-cpu-moe=0", expert_slots=8)  # every expert on the device from the start
    got = m.logits(ids)
    assert calls and m.stats.device_experts > 0
    assert np.abs(got - ref).max() / ref.std() < 1e-4


def test_torch_fallback_without_triton(monkeypatch):
    """Where Triton cannot run: dense weights dequantized once (fp32 on the CPU device), device experts dequantized
    by torch per use; the logits are the kernels' logits."""
    path = tiny_gguf("qwen3moe", "Q8_0")
    ids = moecli.load(path, engine="torch").tokenize(TEXT)
    want = moecli.load(path, placement="lru", expert_slots=8).logits(ids)
    monkeypatch.setattr(D, "use_triton", lambda device_type: False)
    m = moecli.load(path, placement="lru", expert_slots=8)
    assert not m.transformer.experts.dev.triton
    assert m.transformer.layers[0].q.weight.dtype == torch.float32
    assert np.abs(m.logits(ids) - want).max() / want.std() < 1e-4


def test_f16_kv_cache_close_to_f32():
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), engine="torch")
    tr = m.transformer
    ids = m.tokenize(TEXT)
    assert tr.new_cache(8).k.dtype == torch.float32  # the CPU device keeps the oracle tests' F32 cache
    logits = {}
    for dt in (torch.float32, torch.float16):
        cache = tr.new_cache(len(ids) + 1, dtype=dt)
        assert cache.k.dtype == dt
        tr.forward(ids[:-1], cache)
        logits[dt] = tr.forward(ids[-1:], cache).numpy()  # a decode step over the cache
    ref = logits[torch.float32]
    assert np.abs(logits[torch.float16] - ref).max() / ref.std() < 2e-2


def test_bench_kernels_prints_a_table():
    r = subprocess.run([sys.executable, "-m", "moecli", "bench", "--kernels", "--quant", "q8_0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("Q8_0")]
    assert len(rows) == 2 and {row[4] for row in rows} == {"1", "32"}
    assert "GB/s" in r.stdout and "TF/s" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "moecli", "bench", "--kernels", "--quant", "q9_k"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
