"""moecli.kernels.torch_dequant against ggml's own numbers: gguf's numpy dequantizer (the reference the brief names)
and ggml's `to_float` through moecli.kernels.ggml. Equality is bitwise in float32 (NaN: same positions)."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from moecli.formats.tensor import TensorData
from moecli.kernels import ggml as G
from moecli.kernels import torch_dequant as D

# gguf.quants can produce these from floats; the others get random bytes (every byte pattern is a valid block).
QUANTIZABLE = [T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]
RANDOM_BYTES = [T.F16, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
# Byte offsets of the fp16 scale fields in one block (d, and dmin/m where the type has one).
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q2_K: (80, 82),
              T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}
ROWS, COLS = 6, 512
rng = np.random.default_rng(0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf on huge MXFP4 scales


def same(got: torch.Tensor, ref: np.ndarray) -> bool:
    """Bitwise float32 equality, NaN payloads aside (NaNs must be in the same places)."""
    got = got.numpy()
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    nan = np.isnan(ref)
    return (got.dtype == np.float32 and got.shape == ref.shape and np.array_equal(nan, np.isnan(got))
            and np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32)))


def reference(raw: np.ndarray, ty, rows: int, cols: int) -> np.ndarray:
    ref = quants.dequantize(raw.reshape(rows, -1), ty).reshape(rows, cols)
    # ggml itself agrees with gguf (FACTS); checked here too, on exactly these bytes.
    assert same(torch.from_numpy(G.to_float(TensorData("t", ty, (cols, rows), raw))), ref)
    return ref


def random_blocks(ty, rows=ROWS, cols=COLS, finite=True) -> np.ndarray:
    """Random bytes for `ty`; with `finite`, every fp16 scale is replaced by a finite one, some of them extreme
    (largest normal, smallest subnormal, zero, negative)."""
    raw = rng.integers(0, 256, rows * D.bytes_per_row(ty, cols), dtype=np.uint8)
    if ty in (T.F16, T.BF16):
        h, inf = raw.view(np.uint16), 0x7C00 if ty == T.F16 else 0x7F80
        h[(h & inf) == inf] &= 0xBFFF  # Inf/NaN -> a large finite value of the same sign
        return raw
    size = GGML_QUANT_SIZES[ty][1]
    blocks = raw.reshape(-1, size)
    extremes = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x0000, 0x0400, 0x3C00], dtype=np.uint16)
    for off in F16_FIELDS.get(ty, ()):
        f = blocks[:, off:off + 2].copy().view(np.uint16)
        f[(f & 0x7C00) == 0x7C00] &= 0xBFFF
        f[: len(extremes), 0] = extremes
        blocks[:, off:off + 2] = f.view(np.uint8)
    return raw


def floats(rows=ROWS, cols=COLS) -> np.ndarray:
    """Normal values with rows of very different magnitude, and a zero row."""
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    x *= np.array([1, 1e-6, 1e4, 0, 1e-30, 3.0][:rows] + [1] * max(0, rows - 6), dtype=np.float32)[:, None]
    return x


def test_supported_types():
    assert set(QUANTIZABLE + RANDOM_BYTES + [T.F32]) == D.SUPPORTED


@pytest.mark.parametrize("ty", QUANTIZABLE, ids=lambda t: t.name)
def test_gguf_quantized_values_are_bit_identical(ty):
    raw = quants.quantize(floats(), ty).reshape(-1).view(np.uint8)
    got = D.dequantize(torch.from_numpy(raw), ty, (ROWS, COLS))
    assert got.is_contiguous()
    assert same(got, reference(raw, ty, ROWS, COLS))


@pytest.mark.parametrize("ty", sorted(D.SUPPORTED - {T.F32}, key=lambda t: t.value), ids=lambda t: t.name)
def test_random_blocks_with_extreme_scales_are_bit_identical(ty):
    raw = random_blocks(ty)
    got = D.dequantize(torch.from_numpy(raw), ty, (ROWS, COLS))
    assert got.is_contiguous()
    assert same(got, reference(raw, ty, ROWS, COLS))


@pytest.mark.parametrize("ty", sorted(D.SUPPORTED, key=lambda t: t.value), ids=lambda t: t.name)
def test_nan_and_inf_scales_give_nan_and_inf_where_ggml_does(ty):
    raw = rng.integers(0, 256, 64 * D.bytes_per_row(ty, 256), dtype=np.uint8)  # ~3% of fp16 fields are Inf/NaN
    if ty in F16_FIELDS:  # make sure some are
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[ty][1])
        for i, pattern in enumerate((0x7C00, 0xFC00, 0x7E00, 0x7C01)):
            blocks[i, F16_FIELDS[ty][0]:F16_FIELDS[ty][0] + 2] = np.array([pattern], np.uint16).view(np.uint8)
    with np.errstate(invalid="ignore"):
        ref = reference(raw, ty, 64, 256)
    assert same(D.dequantize(torch.from_numpy(raw), ty, (64, 256)), ref)


@pytest.mark.parametrize("ty", sorted(D.SUPPORTED, key=lambda t: t.value), ids=lambda t: t.name)
def test_the_cuda_bit_field_path_on_this_device(ty, monkeypatch):
    """CUDA unpacks bit fields with one broadcast op where the CPU does one op per field: run that path here."""
    monkeypatch.setattr(D, "_FIELD_BY_FIELD", frozenset())
    raw = random_blocks(ty)
    assert same(D.dequantize(torch.from_numpy(raw), ty, (ROWS, COLS)), reference(raw, ty, ROWS, COLS))


def test_mxfp4_every_exponent():
    """E8M0 scales 0 and 1 give fp32 subnormals (ggml_e8m0_to_fp32_half), 255 the largest power of two."""
    raw = rng.integers(0, 256, (256, 17), dtype=np.uint8)
    raw[:, 0] = np.arange(256)
    raw = raw.reshape(-1)
    assert same(D.dequantize(torch.from_numpy(raw), T.MXFP4, (8, 1024)), reference(raw, T.MXFP4, 8, 1024))


@pytest.mark.parametrize("ty", [T.Q4_K, T.MXFP4, T.Q5_0, T.BF16, T.F16], ids=lambda t: t.name)
def test_one_expert_of_a_3d_tensor(ty):
    """Experts are slices of a bigger uint8 buffer: at an odd byte offset (so 2-byte fields are unaligned), and as
    a non-contiguous view (experts interleaved row by row)."""
    n_exp, rows, cols = 3, 4, 256
    row_bytes = D.bytes_per_row(ty, cols)
    raw = random_blocks(ty, n_exp * rows, cols)
    ref = reference(raw, ty, n_exp * rows, cols).reshape(n_exp, rows, cols)
    # contiguous experts, the whole tensor starting one byte into a bigger buffer
    big = torch.zeros(raw.size + 1, dtype=torch.uint8)
    big[1:] = torch.from_numpy(raw)
    stacked = big[1:].view(n_exp, rows * row_bytes)
    for e in range(n_exp):
        assert stacked[e].storage_offset() % 2 == 1
        assert same(D.dequantize(stacked[e], ty, (rows, cols)), ref[e])
    # rows of all experts interleaved: expert e is a strided (non-contiguous) view
    inter = torch.from_numpy(raw.reshape(n_exp, rows, row_bytes).transpose(1, 0, 2).copy())
    for e in range(n_exp):
        view = inter[:, e, :]
        assert not view.is_contiguous()
        assert same(D.dequantize(view, ty, (rows, cols)), ref[e])


@pytest.mark.parametrize("ty", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16, T.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_outputs_are_the_float32_result_rounded_once(ty, dtype):
    raw = torch.from_numpy(random_blocks(ty))
    got = D.dequantize(raw, ty, (ROWS, COLS), dtype=dtype)
    assert got.dtype == dtype and got.shape == (ROWS, COLS)
    assert torch.equal(got, D.dequantize(raw, ty, (ROWS, COLS)).to(dtype))


def test_result_is_a_new_tensor():
    raw = torch.from_numpy(rng.standard_normal(64, dtype=np.float32)).view(torch.uint8)
    out = D.dequantize(raw, T.F32, (4, 16))
    out.zero_()
    assert raw.view(torch.float32).abs().sum() > 0


def test_bytes_per_row_and_errors():
    assert D.bytes_per_row(T.Q4_K, 2048) == 8 * 144
    assert D.bytes_per_row(T.MXFP4, 2880) == 90 * 17
    assert D.bytes_per_row(T.F16, 3) == 6
    with pytest.raises(ValueError, match="256"):
        D.bytes_per_row(T.Q4_K, 100)
    with pytest.raises(ValueError, match="bytes"):
        D.dequantize(torch.zeros(100, dtype=torch.uint8), T.Q4_0, (2, 64))
    with pytest.raises(TypeError):
        D.dequantize(torch.zeros(72, dtype=torch.int8), T.Q4_0, (2, 64))
    with pytest.raises(ValueError, match="IQ2_XXS"):
        D.dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (1, 256))


def test_bench_runs(capsys):
    res = D.bench([T.Q4_K, T.F16], rows=8, cols=256, iters=1, repeats=1, device="cpu")
    assert set(res) == {"Q4_K", "F16"} and "Q4_K" in capsys.readouterr().out
