"""The Triton GGUF kernels (moecli.kernels.gguf_triton, through moecli.kernels.device_ops) against ggml's own
`to_float` x an fp64 matmul, run by Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on small ragged
shapes: rows not a multiple of the tile, a K tail shorter than the tile, 1 / 7 / 33 tokens (decode and tl.dot
forms), experts with no tokens, not on the device, or chosen twice. Random bytes exercise every bit of every field;
scales are kept finite and moderate so that fp32 sums cannot overflow. Tolerance: fp32 accumulation, relative to
sum |x| |w|. Deliberately broken kernels (swapped nibbles, swapped scale/min, a dropped mask) must be caught."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402  (the broken kernels below are jit functions of this module)

from moecli.formats.tensor import TensorData  # noqa: E402
from moecli.kernels import device_ops as D  # noqa: E402
from moecli.kernels import ggml as G  # noqa: E402
from moecli.kernels import gguf_triton as K  # noqa: E402

if not D.use_triton("cpu"):
    pytest.skip("Triton's interpreter is not enabled (TRITON_INTERPRET=1)", allow_module_level=True)



@pytest.fixture(autouse=True)
def forms_as_on_gpu(monkeypatch):
    """1-16 rows take the decode form, more the tl.dot form, as on a GPU (the interpreter would take tl.dot)."""
    monkeypatch.setattr(D, "FORMS_AS_ON_GPU", True)


TYPES = sorted(D.TRITON_TYPES, key=lambda t: t.value)
# byte offsets of fp16 scale fields in a block; MXFP4's E8M0 exponent at 0
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q2_K: (80, 82),
              T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu(-huge)
TOL = 2e-6  # fp32 accumulation over <= 512 terms, relative to sum |x||w|


def cols_for(ty, ragged=True) -> int:
    """K: two super-blocks for 256-element types, else 9 blocks (288: a tail of 32 after a 256-wide tile)."""
    block = GGML_QUANT_SIZES[ty][0]
    return 512 if block == 256 else (288 if ragged else 256)


def random_weight(ty, rows, cols, rng) -> np.ndarray:
    """Random bytes of a rows x cols `ty` tensor, scales replaced by finite random ones of moderate size."""
    raw = rng.integers(0, 256, rows * D.row_bytes(ty, cols), dtype=np.uint8)
    if ty in (T.F32, T.F16, T.BF16):
        vals = rng.standard_normal(rows * cols, dtype=np.float32)
        if ty == T.F32:
            return vals.view(np.uint8).copy()
        if ty == T.F16:
            return vals.astype(np.float16).view(np.uint8).copy()
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).copy()
    size = GGML_QUANT_SIZES[ty][1]
    blocks = raw.reshape(-1, size)
    if ty == T.MXFP4:
        blocks[:, 0] = rng.integers(110, 135, len(blocks))  # 2^-18 .. 2^7 (and e < 2 subnormals in a few)
        blocks[:3, 0] = (0, 1, 2)
    for off in F16_FIELDS.get(ty, ()):
        s = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        s[:2] = (0.0, 6e-8)  # zero and the smallest subnormal
        blocks[:, off:off + 2] = s.view(np.uint8).reshape(-1, 2)
    return raw


def ggml_values(ty, raw, rows, cols) -> np.ndarray:
    return G.to_float(TensorData("w", ty, (cols, rows), raw)).astype(np.float64).reshape(rows, cols)


def check(got: torch.Tensor, ref: np.ndarray, scale: np.ndarray):
    got = got.double().numpy()
    err = np.abs(got - ref) / np.maximum(scale, 1e-30)
    assert np.isfinite(got).all()
    assert err.max() <= TOL, f"max relative error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def run_linear(ty, m, rows=7, bias=False, seed=0, cols=None):
    rng = np.random.default_rng(seed)
    cols = cols or cols_for(ty)
    raw = random_weight(ty, rows, cols, rng)
    w = ggml_values(ty, raw, rows, cols)
    x = rng.standard_normal((m, cols), dtype=np.float32)
    b = rng.standard_normal(rows, dtype=np.float32) if bias else None
    buf = torch.full((len(raw) + 4096,), 0xFF, dtype=torch.uint8)  # a guard of NaN scales after the tensor
    buf[:len(raw)] = torch.from_numpy(raw)
    got = D.linear(torch.from_numpy(x), D.QuantWeight(buf[:len(raw)], ty, (rows, cols)),
                   None if b is None else torch.from_numpy(b))
    ref = x.astype(np.float64) @ w.T + (0 if b is None else b)
    check(got, ref, np.abs(x).astype(np.float64) @ np.abs(w).T + (0 if b is None else np.abs(b)))


@pytest.mark.parametrize("m", [1, 3, 7, 33], ids=["1tok", "3tok", "7tok-dot16", "33tok-dot"])
@pytest.mark.parametrize("ty", TYPES, ids=lambda t: t.name)
def test_linear_matches_ggml(ty, m):
    run_linear(ty, m)


def test_linear_bias_and_many_tiles():
    run_linear(T.Q4_K, 3, rows=70, bias=True)  # 5 row tiles of 16, the last one 6 rows
    run_linear(T.Q8_0, 40, rows=21, bias=True, cols=32)  # K smaller than any tile


# -- grouped experts ---------------------------------------------------------------------------------------------
E, DM = 5, 256  # experts, hidden (K-quant rows need 256)


def build_layer(types, ff, rng, biased=False):
    """Random gate/up/down of E experts of `types` ([ff, DM], [ff, DM], [DM, ff]) packed into E slots of an odd
    size (nothing may assume aligned slots): storage[e] = gate|up|down bytes of expert e."""
    shapes = [(ff, DM), (ff, DM), (DM, ff)]
    parts, vals, blobs, off = [], [], [], 0
    for ty, (r, c) in zip(types, shapes):
        per = [random_weight(ty, r, c, rng) for _ in range(E)]
        vals.append([ggml_values(ty, p, r, c) for p in per])
        blobs.append(per)
        parts.append((ty, (r, c), off))
        off += len(per[0])
    slot_bytes = off + 3
    storage = np.zeros((E, slot_bytes), dtype=np.uint8)
    for e in range(E):
        storage[e, :off] = np.concatenate([blobs[i][e] for i in range(3)])
    biases = tuple(rng.standard_normal((E, n), dtype=np.float32) for n in (ff, ff, DM)) if biased else None
    return parts, slot_bytes, storage, vals, biases


def glu64(g, u, act):
    if act == "swiglu_oai":
        g = np.minimum(g, 7.0)
        u = np.clip(u, -7.0, 7.0)
        return g / (1.0 + np.exp(-1.702 * g)) * (u + 1.0)
    if act == "reglu":
        return np.maximum(g, 0.0) * u
    return g / (1.0 + np.exp(-g)) * u


def run_grouped(types, n_tok, act="swiglu", biased=False, seed=0):
    """Two routed experts per token among experts 0-3 (expert 4 gets none), token 0 routed to expert 1 twice,
    expert 1 not on the device (its pairs add nothing), the others in shuffled slots."""
    ff = 256 if any(GGML_QUANT_SIZES[t][0] == 256 for t in types) else 96  # 96: ragged vs 64-wide tiles
    rng = np.random.default_rng(seed)
    parts, slot_bytes, storage, vals, biases = build_layer(types, ff, rng, biased)
    x = rng.standard_normal((n_tok, DM), dtype=np.float32)
    k = 2
    ids = np.stack([rng.choice(4, k, replace=False) for _ in range(n_tok)])
    if n_tok > 1:
        ids[0] = (1, 1)
    ids[-1] = (2, 2)  # a device expert twice
    w = rng.random((n_tok, k), dtype=np.float32)
    slot_of = np.array([3, -1, 0, 2, 1], dtype=np.int32)
    slots = np.zeros_like(storage)
    for e, s in enumerate(slot_of):
        if s >= 0:
            slots[s] = storage[e]
    pair_tok = np.repeat(np.arange(n_tok), k)
    got = D.grouped_experts(torch.from_numpy(x), torch.from_numpy(pair_tok), torch.from_numpy(ids.reshape(-1)),
                            torch.from_numpy(w.reshape(-1)), torch.from_numpy(slot_of), torch.from_numpy(slots),
                            D.ExpertLayout(parts, slot_bytes),
                            None if biases is None else tuple(torch.from_numpy(b) for b in biases), act)
    ref = np.zeros((n_tok, DM))
    scale = np.full_like(ref, 1e-3)
    for p, (t, e) in enumerate(zip(pair_tok, ids.reshape(-1))):
        if slot_of[e] < 0:
            continue
        g, u, dn = (vals[i][e] for i in range(3))
        xi = x[t].astype(np.float64)
        bg, bu, bd = (b[e] for b in biases) if biases is not None else (0, 0, 0)
        hi = glu64(g @ xi + bg, u @ xi + bu, act)
        hs = np.abs(glu64(np.abs(g) @ np.abs(xi) + np.abs(bg), np.abs(u) @ np.abs(xi) + np.abs(bu), "swiglu"))
        ref[t] += w.reshape(-1)[p] * (dn @ hi + bd)
        scale[t] += w.reshape(-1)[p] * (np.abs(dn) @ (np.abs(hi) + hs) + np.abs(bd))
    check(got, ref, scale)


@pytest.mark.parametrize("n_tok", [1, 3, 20], ids=["1tok", "3tok", "20tok-dot"])
@pytest.mark.parametrize("ty", TYPES, ids=lambda t: t.name)
def test_grouped_experts_match_ggml(ty, n_tok):
    run_grouped((ty, ty, ty), n_tok)


def test_grouped_mixed_types_and_gpt_oss_glu_with_biases():
    run_grouped((T.Q4_K, T.Q4_K, T.Q6_K), 7)  # a Q4_K_M layer
    run_grouped((T.MXFP4, T.MXFP4, T.MXFP4), 7, act="swiglu_oai", biased=True)  # gpt-oss
    run_grouped((T.Q8_0, T.Q5_0, T.BF16), 20, act="swiglu_oai", biased=True)
    run_grouped((T.Q4_K, T.Q4_K, T.Q6_K), 7, act="reglu")  # SmallThinker


def test_grouped_no_pairs_and_pair_blocks():
    out = D.grouped_experts(torch.zeros(3, 32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(0), torch.zeros(4, dtype=torch.int32), torch.zeros(1, 100, dtype=torch.uint8),
                            D.ExpertLayout([(T.F16, (8, 32), 0), (T.F16, (8, 32), 0), (T.F16, (32, 8), 0)], 100))
    assert out.shape == (3, 32) and not out.any()
    be, bp = D.pair_blocks(torch.tensor([2, 0, 2, 2, 2]), 4, 2)
    used = be < 4
    assert be[used].tolist() == [0, 2, 2] and bp[used].tolist() == [[1, -1], [0, 2], [3, 4]]
    assert (bp[~used] == -1).all()


# -- the tests catch broken kernels ------------------------------------------------------------------------------
_orig_scale_min = K._k_scale_min


@triton.jit
def _swapped_nibbles(qs, j, mask):
    return (K._u8(qs + (j & 15), mask) >> ((1 - (j >> 4)) * 4)) & 15


@triton.jit
def _swapped_scale_min(s, sb, mask):
    sc, m = _orig_scale_min(s, sb, mask)
    return m, sc


@triton.jit
def _unmasked_u8(p, mask):
    return tl.load(p).to(tl.int32)


@pytest.mark.parametrize("name, broken, ty", [("_nib32", _swapped_nibbles, T.Q4_0),
                                               ("_k_scale_min", _swapped_scale_min, T.Q4_K),
                                               ("_u8", _unmasked_u8, T.Q8_0)], ids=["bit-order", "scale", "mask"])
def test_a_broken_kernel_is_caught(monkeypatch, name, broken, ty):
    """The interpreter resolves the helpers through the module at run time, so a patched helper is what runs. The
    mask case: the K tail (288 = 256 + 32) reads past the last row into the NaN guard."""
    run_linear(ty, 1)  # the real kernel passes on these bytes
    monkeypatch.setattr(K, name, broken)
    with pytest.raises(AssertionError):
        run_linear(ty, 1)
