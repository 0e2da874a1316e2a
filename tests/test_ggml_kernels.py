"""moecli.kernels.ggml against independent references: gguf's numpy dequantizer, float64 matmuls on the values ggml
actually multiplies (weights dequantized, activations round-tripped through the weight's vec_dot_type)."""
import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, quants

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData
from moecli.kernels import ggml as G

TYPES = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.MXFP4]
rng = np.random.default_rng(0)


def weight(ty, rows=48, cols=512, name="w"):
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    raw = w.reshape(-1).view(np.uint8) if ty == T.F32 else G.quantize(w, ty)
    return TensorData(name, ty, (cols, rows), raw), w


def test_layout_check_matches_library():
    assert G.ggml_tensor_overhead() == G.GGML_OBJECT_SIZE + ctypes.sizeof(G.ggml_tensor) == 368


@pytest.mark.parametrize("ty", TYPES)
def test_to_float_is_bit_identical_to_gguf_reference(ty):
    t, w = weight(ty)
    rows = t.raw.reshape(t.ne[1], -1)
    try:
        ref = quants.dequantize(rows, ty)
    except NotImplementedError:
        pytest.skip(f"gguf has no numpy dequantizer for {ty.name}")
    got = G.to_float(t)
    assert got.dtype == np.float32 and got.shape == (48, 512)
    assert np.array_equal(got, ref)
    # and it is a real quantization of the input, not garbage
    assert np.abs(got - w).max() < 0.6 * np.abs(w).max()


def test_quantize_matches_gguf_python_quantizer():
    w = rng.standard_normal((8, 256), dtype=np.float32)
    for ty in (T.Q8_0, T.Q4_0, T.BF16):
        assert np.array_equal(G.quantize(w, ty), quants.quantize(w, ty).reshape(-1)), ty.name


def test_quantize_rejects_bad_rows():
    with pytest.raises(MoecliError, match="block"):
        G.quantize(np.zeros((2, 100), np.float32), T.Q4_K)


@pytest.mark.parametrize("ty", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.IQ4_NL])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_matmul_equals_float64_on_the_values_ggml_multiplies(ty, n):
    t, _ = weight(ty)
    x = rng.standard_normal((n, 512), dtype=np.float32)
    y = G.matmul(t, x)
    assert y.shape == (n, 48) and y.dtype == np.float32
    xq = G.quantize_activations(x, G.vec_dot_type(ty)).astype(np.float64)
    ref = xq @ G.to_float(t).astype(np.float64).T
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()
    # against plain fp32 activations the difference is ggml's activation quantization, not an error
    assert np.abs(y - x @ G.to_float(t).T).max() <= 3e-2 * np.abs(ref).max()


def test_matmul_batched_equals_rowwise_and_cached_graphs_rebind():
    t, _ = weight(T.Q4_K)
    x = rng.standard_normal((5, 512), dtype=np.float32)
    rows = np.stack([G.matmul(t, x[i]) for i in range(5)])  # the cached n=1 graph, five different inputs
    assert np.array_equal(rows, G.matmul(t, x))  # gemv per row == ggml's batched path for 5 rows
    assert np.array_equal(G.matmul(t, x), G.matmul(t, x.copy()))


def test_matmul_torch_in_torch_out():
    t, _ = weight(T.Q8_0)
    x = rng.standard_normal((2, 512), dtype=np.float32)
    y = G.matmul(t, torch.from_numpy(x))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert np.array_equal(y.numpy(), G.matmul(t, x))


def test_matmul_rejects_wrong_shape():
    t, _ = weight(T.Q8_0)
    with pytest.raises(MoecliError, match=r"x \[n, 512\]"):
        G.matmul(t, np.zeros((2, 256), np.float32))


def test_threadpool_size_does_not_change_results():
    t, _ = weight(T.Q4_K, rows=256)
    x = rng.standard_normal((4, 512), dtype=np.float32)
    before = G.matmul(t, x)
    try:
        assert G.set_threads(1) == 1
        assert np.array_equal(G.matmul(t, x), before)
    finally:
        G.set_threads()
    assert G.n_threads() == G.physical_cores()


@pytest.mark.parametrize("n", [1, 5, 40])  # cached decode graphs and per-call prefill graphs
def test_swiglu_ffn_one_graph_equals_its_parts(n):
    rng = np.random.default_rng(3)
    d, ff = 64, 96
    w = {k: rng.standard_normal(s, dtype=np.float32) * 0.2 for k, s in
         (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff)))}
    t = {k: TensorData(k, T.F32, v.shape[::-1], v.reshape(-1).view(np.uint8)) for k, v in w.items()}
    x = rng.standard_normal((n, d), dtype=np.float32)
    g, u = x @ w["gate"].T, x @ w["up"].T
    want = (g / (1 + np.exp(-g)) * u) @ w["down"].T
    got = G.swiglu_ffn(t["gate"], t["up"], t["down"], x)
    assert got.shape == (n, d) and np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    xt = torch.from_numpy(x)
    assert torch.equal(G.swiglu_ffn(t["gate"], t["up"], t["down"], xt), torch.from_numpy(got))
    with pytest.raises(MoecliError, match="FFN shapes"):
        G.swiglu_ffn(t["gate"], t["up"], t["down"], x[:, :10])
