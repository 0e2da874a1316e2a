"""CpuExperts: ggml expert kernels against an independent float64 reference, against each other, and (when the
llama.cpp oracle fixtures are present) against llama.cpp's own `ffn_moe_out` per layer."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData
from moecli.kernels import ggml as G
from moecli.runtime.cpu_experts import CpuExperts

D, FF, E, K, N = 256, 512, 8, 2, 5


def experts(ty, seed=0):
    rng = np.random.default_rng(seed)

    def stack(name, rows, cols):
        w = rng.standard_normal((E * rows, cols), dtype=np.float32) * 0.1
        raw = w.reshape(-1).view(np.uint8) if ty == T.F32 else G.quantize(w, ty)
        return TensorData(name, ty, (cols, rows, E), raw)

    return stack("gate", FF, D), stack("up", FF, D), stack("down", D, FF)


def routing(seed=1, n=N):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D), dtype=np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(n)])
    w = rng.random((n, K), dtype=np.float32)
    return x, np.repeat(np.arange(n), K), ids.reshape(-1), w.reshape(-1)


def reference(gate, up, down, x, tok, ids, w):
    """float64 on the values ggml multiplies: dequantized weights, activations through vec_dot_type."""
    out = np.zeros((x.shape[0], D))
    for t, e, wt in zip(tok, ids, w):
        xq = G.quantize_activations(x[t:t + 1], G.vec_dot_type(gate.type)).astype(np.float64)
        g = xq @ G.to_float(gate.expert(e)).T
        u = xq @ G.to_float(up.expert(e)).T
        a = (g / (1 + np.exp(-g)) * u).astype(np.float32)
        aq = G.quantize_activations(a, G.vec_dot_type(down.type)).astype(np.float64)
        out[t] += wt * (aq @ G.to_float(down.expert(e)).T)[0]
    return out


@pytest.mark.parametrize("ty", [T.F32, T.BF16, T.Q8_0, T.Q4_K, T.Q6_K, T.IQ4_NL])
def test_kernels_equal_float64_reference(ty):
    gate, up, down = experts(ty)
    x, tok, ids, w = routing()
    ref = reference(gate, up, down, x, tok, ids, w)
    for kernel in ("id", "loop"):
        got = CpuExperts({3: (gate, up, down)}, kernel=kernel).run(3, x, tok, ids, w)
        assert got.shape == (N, D) and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 2e-6 * np.abs(ref).max(), kernel


def test_subset_of_pairs_decode_cached_and_uncached_graphs_agree():
    gate, up, down = experts(T.Q4_K)
    x, tok, ids, w = routing(n=12)
    small = CpuExperts({0: (gate, up, down)}, kernel="id", max_cached_pairs=64)
    big = CpuExperts({0: (gate, up, down)}, kernel="id", max_cached_pairs=4)  # builds a graph per call
    keep = np.arange(len(ids)) % 3 != 1  # some pairs went elsewhere (GPU): rows get fewer experts, one maybe none
    a = small.run(0, x, tok[keep], ids[keep], w[keep])
    assert np.array_equal(a, big.run(0, x, tok[keep], ids[keep], w[keep]))
    assert np.array_equal(a, small.run(0, x, tok[keep], ids[keep], w[keep]))  # cached graph reused
    # decode: one token, its pairs, through the cached graph, equals the same token inside the batch
    one = small.run(0, x[4:5], tok[tok == 4] * 0, ids[tok == 4], w[tok == 4])
    assert np.array_equal(one[0], small.run(0, x, tok, ids, w)[4])
    # a token with no CPU pair gets zeros
    assert not small.run(0, x, tok[tok != 2], ids[tok != 2], w[tok != 2])[2].any()


def test_per_expert_tensors_evenly_spaced_use_mul_mat_id_else_loop():
    gate, up, down = experts(T.Q8_0)
    x, tok, ids, w = routing()
    want = CpuExperts({0: (gate, up, down)}, kernel="id").run(0, x, tok, ids, w)
    lists = tuple([t.expert(e) for e in range(E)] for t in (gate, up, down))
    ce = CpuExperts({0: lists})
    assert ce.layers[0].stacked is not None and ce.choose_kernel(0, len(ids), E) == "id"
    assert np.array_equal(ce.run(0, x, tok, ids, w), want)
    # safetensors-like: each expert its own allocation, not evenly spaced -> loop only
    scattered = tuple([TensorData(t.name, t.type, t.ne, t.raw.copy()) for t in lst] for lst in lists)
    ce = CpuExperts({0: scattered})
    assert ce.layers[0].stacked is None and ce.choose_kernel(0, len(ids), E) == "loop"
    got = ce.run(0, x, tok, ids, w)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_invalid_ids_raise_instead_of_reading_out_of_bounds():
    ce = CpuExperts({0: experts(T.Q4_0)})
    x, tok, ids, w = routing()
    for bad in (E, -1, 10 ** 6):
        b = ids.copy()
        b[3] = bad
        with pytest.raises(MoecliError, match="expert id .* out of range"):
            ce.run(0, x, tok, b, w)
    with pytest.raises(MoecliError, match="token index"):
        ce.run(0, x, tok + 1, ids, w)
    with pytest.raises(MoecliError, match="no CPU experts for layer 7"):
        ce.run(7, x, tok, ids, w)
    with pytest.raises(MoecliError, match="float32"):
        ce.run(0, x.astype(np.float64), tok, ids, w)


def test_submit_overlaps_and_accepts_torch():
    ce = CpuExperts({0: experts(T.Q4_K)})
    x, tok, ids, w = routing()
    want = ce.run(0, x, tok, ids, w)
    fut = ce.submit(0, torch.from_numpy(x), torch.from_numpy(tok), torch.from_numpy(ids), torch.from_numpy(w))
    got = fut.result(timeout=30)
    ce.close()
    assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), want)


def test_mismatched_shapes_are_refused():
    gate, up, down = experts(T.Q8_0)
    with pytest.raises(MoecliError, match="expert shapes disagree"):
        CpuExperts({0: (gate, up, gate)})


# --- llama.cpp oracle: the engine's expert output equals ffn_moe_out, fed llama.cpp's own inputs and routing ---------
# A small self-contained oracle (random tiny GGUF + cb_eval capture) until tests/llama_oracle.py lands; it isolates
# the expert kernel: x = llama.cpp's ffn_norm-<l>, pairs = its ffn_moe_topk-<l> and routing weights.

ARCHS = {  # arch -> routing-weight tensor llama.cpp multiplies the expert outputs by
    "qwen3moe": "ffn_moe_weights_norm", "llama": "ffn_moe_weights_norm",
    "qwen2moe": "ffn_moe_weights", "olmoe": "ffn_moe_weights",
}
# ftype -> types of (gate/up, down); "Q4_K_M" mixes like llama.cpp's Q4_K_M does in its down projections
FTYPES = {"F32": (T.F32, T.F32), "Q8_0": (T.Q8_0, T.Q8_0), "Q4_K": (T.Q4_K, T.Q4_K), "Q4_K_M": (T.Q4_K, T.Q6_K)}
OD, OFF, OE, OK, HEADS, NL, VOCAB = 256, 256, 8, 2, 4, 2, 320


def write_tiny_gguf(path, arch, ftype, seed=0):
    import gguf

    rng = np.random.default_rng(seed)
    hd = OD // HEADS
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_context_length(64), wr.add_embedding_length(OD), wr.add_block_count(NL)
    wr.add_head_count(HEADS), wr.add_head_count_kv(HEADS), wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_freq_base(10000.0), wr.add_expert_count(OE), wr.add_expert_used_count(OK)
    if arch == "qwen3moe":
        wr.add_key_length(hd), wr.add_value_length(hd), wr.add_expert_feed_forward_length(OFF)
    elif arch == "qwen2moe":
        wr.add_expert_feed_forward_length(OFF), wr.add_expert_shared_feed_forward_length(OFF)
    else:
        wr.add_feed_forward_length(OFF)
        if arch == "llama":
            wr.add_rope_dimension_count(hd)
    wr.add_tokenizer_model("gpt2"), wr.add_tokenizer_pre("gpt-2")
    toks = [bytes([b]).decode("latin-1") for b in range(256)] + ["ab"] + [f"<t{i}>" for i in range(VOCAB - 257)]
    wr.add_token_list(toks), wr.add_token_types([1] * VOCAB), wr.add_token_merges(["a b"])  # llama.cpp refuses a gpt2 vocab without merges
    wr.add_bos_token_id(VOCAB - 1), wr.add_eos_token_id(VOCAB - 1)

    def add(name, shape, ty=T.F32, scale=0.05):
        w = (rng.standard_normal(shape, dtype=np.float32) * scale)
        if ty == T.F32:
            wr.add_tensor(name, w)
        else:
            wr.add_tensor(name, G.quantize(w, ty).reshape(*shape[:-1], -1), raw_dtype=ty)

    add("token_embd.weight", (VOCAB, OD), scale=1.0)
    add("output_norm.weight", (OD,), scale=0.0 + 1.0)
    add("output.weight", (VOCAB, OD))
    gu, dn = FTYPES[ftype]
    for l in range(NL):
        b = f"blk.{l}."
        for n in ("attn_norm", "ffn_norm"):
            add(b + n + ".weight", (OD,), scale=1.0)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(b + n + ".weight", (OD, OD))
        if arch == "qwen3moe":
            add(b + "attn_q_norm.weight", (hd,), scale=1.0), add(b + "attn_k_norm.weight", (hd,), scale=1.0)
        if arch == "olmoe":
            add(b + "attn_q_norm.weight", (OD,), scale=1.0), add(b + "attn_k_norm.weight", (OD,), scale=1.0)
        add(b + "ffn_gate_inp.weight", (OE, OD), scale=0.5)
        add(b + "ffn_gate_exps.weight", (OE, OFF, OD), gu)
        add(b + "ffn_up_exps.weight", (OE, OFF, OD), gu)
        add(b + "ffn_down_exps.weight", (OE, OD, OFF), dn)
        if arch == "qwen2moe":
            add(b + "ffn_gate_inp_shexp.weight", (OD,))
            add(b + "ffn_gate_shexp.weight", (OFF, OD)), add(b + "ffn_up_shexp.weight", (OFF, OD))
            add(b + "ffn_down_shexp.weight", (OD, OFF))
    wr.write_header_to_file(), wr.write_kv_data_to_file(), wr.write_tensors_to_file()
    wr.close()


def llama_capture(path, token_ids, names, repack=False):
    """Run llama.cpp on token_ids and copy the tensors called NAME-<layer> for NAME in names, via cb_eval.
    repack=False keeps llama.cpp on the plain (non-CPU_REPACK) kernels our "id" path uses, so outputs are bit-exact;
    with its repacked Q4_K kernels they differ at ~3e-7 (another accumulation order)."""
    import ctypes

    import llama_cpp as L

    got = {}

    def cb(t, ask, _):
        tt = ctypes.cast(t, ctypes.POINTER(G.ggml_tensor)).contents
        name = tt.name.decode()
        if name.rsplit("-", 1)[0] not in names:
            return not ask and True
        if ask:
            return True
        dtype = {0: np.float32, 26: np.int32}[tt.type]
        shape = tuple(reversed([tt.ne[i] for i in range(4)]))
        strides = tuple(reversed([tt.nb[i] for i in range(4)]))
        buf = (ctypes.c_char * (tt.nb[3] * tt.ne[3])).from_address(tt.data)
        a = np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=np.uint8).view(dtype), shape, strides)
        got[name] = a.copy().reshape(tt.ne[2] * tt.ne[3] * tt.ne[1], tt.ne[0]) if tt.ne[2] * tt.ne[3] > 1 \
            else a.copy().reshape(tt.ne[1], tt.ne[0])
        return True

    cb_c = L.ggml_backend_sched_eval_callback(cb)  # keep a reference for the context's lifetime
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = repack
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp could not load {path}"
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.type_k = cp.type_v = 0
    cp.flash_attn_type = 0
    cp.cb_eval, cp.cb_eval_user_data = cb_c, None
    ctx = L.llama_init_from_model(model, cp)
    try:
        arr = (ctypes.c_int32 * len(token_ids))(*token_ids)
        assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(token_ids))) == 0
    finally:
        L.llama_free(ctx), L.llama_model_free(model)
    return got


@pytest.mark.parametrize("ftype", list(FTYPES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_expert_output_equals_llama_cpp_ffn_moe_out(tmp_path, arch, ftype):
    from moecli.formats.gguf import GGUFFile

    path = tmp_path / f"{arch}-{ftype}.gguf"
    write_tiny_gguf(path, arch, ftype)
    names = ("ffn_norm", "ffn_moe_topk", ARCHS[arch], "ffn_moe_out")
    cap = llama_capture(path, [1, 17, 99, 250, 3, 42], names)
    f = GGUFFile(path)
    ce = CpuExperts({l: tuple(f.tensors[f"blk.{l}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
                     for l in range(NL)})
    loop = CpuExperts({l: tuple(f.tensors[f"blk.{l}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
                                     for l in range(NL)}, kernel="loop")
    for l in range(NL):  # llama.cpp skips unused rows before the last layer's FFN: layer 1 is a 1-token decode
        x = np.ascontiguousarray(cap[f"ffn_norm-{l}"], dtype=np.float32)
        ids = cap[f"ffn_moe_topk-{l}"]
        w = cap[f"{ARCHS[arch]}-{l}"].reshape(ids.shape)
        want = cap[f"ffn_moe_out-{l}"]
        pairs = np.repeat(np.arange(len(x)), OK), ids.reshape(-1), w.reshape(-1)
        assert np.array_equal(ce.run(l, x, *pairs), want), l  # mul_mat_id: the very kernel llama.cpp ran
        got = loop.run(l, x, *pairs)  # llamafile sgemm accumulates in another order
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), l


@pytest.mark.parametrize("ftype", ["Q4_K", "Q4_K_M"])
def test_repacked_stacks_equal_llama_cpp_repacked_kernels(tmp_path, ftype):
    """Q4_K stacks repacked for llama.cpp's interleaved kernels (the CPU engine's default; Q4_K_M's Q6_K down stays
    in the file's layout): decode-sized calls run repacked mul_mat_id, llama.cpp's own kernel with its repacking on,
    so ffn_moe_out is identical; prompt-sized calls run the repacked gemm per expert (another summation order), and
    read nothing from the released file pages."""
    from moecli.formats.gguf import GGUFFile

    path = tmp_path / f"qwen3moe-{ftype}.gguf"
    write_tiny_gguf(path, "qwen3moe", ftype)
    names = ("ffn_norm", "ffn_moe_topk", ARCHS["qwen3moe"], "ffn_moe_out")
    tokens = [1, 17, 99, 250, 3, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 2
    cap = llama_capture(path, tokens, names, repack=True)
    f = GGUFFile(path)
    stacks = {l: tuple(f.tensors[f"blk.{l}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")) for l in range(NL)}
    for s in stacks.values():
        for t in s:
            assert G.repack(t) == (t.type == T.Q4_K)
    ce = CpuExperts(stacks)
    assert all(L.repacked for L in ce.layers.values())
    assert [v is None for v in ce.layers[0].repacked_views] == [False, False, ftype == "Q4_K_M"]
    for l in range(NL):  # layer 1 runs the last token only (llama.cpp's out_ids): a decode-sized call
        x = np.ascontiguousarray(cap[f"ffn_norm-{l}"], dtype=np.float32)
        ids = cap[f"ffn_moe_topk-{l}"]
        pairs = np.repeat(np.arange(len(x)), OK), ids.reshape(-1), cap[f"{ARCHS['qwen3moe']}-{l}"].reshape(-1)
        want = cap[f"ffn_moe_out-{l}"]
        kernel = ce.choose_kernel(l, len(ids.reshape(-1)), len(np.unique(ids)))
        assert kernel == ("loop" if len(x) > 1 else "id"), (l, kernel)  # 32 tokens: 8 per expert
        got = ce.run(l, x, *pairs)
        if kernel == "id":
            assert np.array_equal(got, want), l
        else:
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), l
            ce.kernel = "id"  # the same pairs through repacked mul_mat_id: llama.cpp's prompt kernel, bit for bit
            assert np.array_equal(ce.run(l, x, *pairs), want), l
            ce.kernel = "auto"
    for s in stacks.values():  # the repacked stacks' file pages were released and never read again
        assert [_resident_pages(t) == 0 for t in s] == [True, True, ftype == "Q4_K"]


def _resident_pages(t) -> int:
    """Pages of t's bytes mapped into this process (/proc/self/pagemap's present bit)."""
    a, page = t.raw.ctypes.data, 4096
    first, last = -(-a // page), (a + t.raw.nbytes) // page  # whole pages only: neighbours share the edges
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first) * 8), dtype=np.uint64)
    return int((entries >> np.uint64(63)).sum())


def test_bad_repack_types_are_one_clear_error(monkeypatch):
    from conftest import tiny_gguf

    import moecli

    monkeypatch.setenv("MOECLI_REPACK", "Q4_K,Q9_Z")
    with pytest.raises(MoecliError, match="MOECLI_REPACK: unknown ggml type Q9_Z"):
        moecli.load(tiny_gguf("qwen3moe", "Q4_K_M"), engine="ggml")
