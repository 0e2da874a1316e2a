"""llama.cpp (llama-cpp-python 0.3.36, low-level API) as a test oracle.

Settings for exact comparisons (FACTS §3): F32 KV cache, flash attention off, logits for every token,
one ubatch holding the whole prompt, 2 threads. Intermediate tensors are captured with cb_eval by their
graph names `NAME-<layer>` ("ffn_moe_topk-0", "ffn_moe_out-1", "result_norm", ...).
llama.cpp's log is silent unless MOECLI_TEST_VERBOSE is set.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import llama_cpp.llama_cpp as L

from moecli.synth import _quiet_llama_log

N_THREADS = 2

# ggml_type -> numpy dtype of tensors we can copy out (quantized intermediates never appear in the graph).
_GGML_F32, _GGML_F16, _GGML_I32, _GGML_BF16 = 0, 1, 26, 30
_DTYPES = {_GGML_F32: np.float32, _GGML_F16: np.float16, _GGML_I32: np.int32, _GGML_BF16: np.uint16}


class _Tensor(ctypes.Structure):
    """Prefix of `struct ggml_tensor` from ggml.h of llama-cpp-python 0.3.36 (x86-64 / LP64)."""
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_base = ctypes.CDLL(str(Path(L.__file__).parent / "lib" / "libggml-base.so"))
_base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_base.ggml_backend_tensor_get.restype = None
_base.ggml_nbytes.argtypes = [ctypes.c_void_p]
_base.ggml_nbytes.restype = ctypes.c_size_t
_base.ggml_tensor_overhead.restype = ctypes.c_size_t
# ggml_tensor_overhead() == sizeof(ggml_object) (32) + sizeof(ggml_tensor): a cheap guard against layout drift.
assert _base.ggml_tensor_overhead() == 32 + ctypes.sizeof(_Tensor), "ggml_tensor layout differs from 0.3.36"
assert _Tensor.name.offset == 256


def _copy_tensor(ptr: int) -> np.ndarray:
    """Copy a (possibly strided, possibly backend-resident) tensor into numpy, shape = ne reversed.

    Leading size-1 dims are dropped but at least 2 dims are kept, so [k, n_tok] → (n_tok, k) even for 1 token.
    """
    t = _Tensor.from_address(ptr)
    dtype = _DTYPES.get(t.type)
    if dtype is None:
        raise TypeError(f"cannot capture {t.name.decode()} of ggml type {t.type}")
    nbytes = _base.ggml_nbytes(ptr)  # span from data to the last element, also for views
    raw = np.empty(nbytes, np.uint8)
    _base.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
    ne, nb = list(t.ne), list(t.nb)
    nd = max(2, max([i + 1 for i in range(4) if ne[i] > 1], default=1))
    shape, strides = tuple(reversed(ne[:nd])), tuple(reversed(nb[:nd]))
    arr = np.array(np.lib.stride_tricks.as_strided(raw.view(dtype), shape, strides))  # contiguous copy
    if t.type == _GGML_BF16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


@contextmanager
def _model(gguf_path):
    L.llama_backend_init()
    _quiet_llama_log()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp failed to load {gguf_path} (set MOECLI_TEST_VERBOSE=1 to see why)")
    try:
        yield model
    finally:
        L.llama_model_free(model)


@contextmanager
def _context(model, n_ctx: int, cb=None, flash_attn: bool = False):
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(n_ctx, 8)
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = N_THREADS
    cp.type_k = cp.type_v = L.GGML_TYPE_F32
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    if cb is not None:
        cp.cb_eval = cb
        cp.cb_eval_user_data = None
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    try:
        yield ctx
    finally:
        L.llama_free(ctx)


def _decode(ctx, tokens, pos0: int, all_logits: bool) -> None:
    n = len(tokens)
    batch = L.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i] = int(tok)
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
    finally:
        L.llama_batch_free(batch)


def _n_vocab(model) -> int:
    return L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))


def _logits(ctx, i: int, n_vocab: int) -> np.ndarray:
    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).astype(np.float32)


def run_llama(gguf_path, token_ids, capture=(), flash_attn: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward pass of `token_ids` (positions 0..n-1) in one ubatch (`flash_attn`: llama.cpp's flash path).

    Returns (logits float32 [n_tokens, n_vocab], {name: array}) for graph tensors whose names are in
    `capture` (e.g. "ffn_moe_topk-0" → int32 [n_tokens, k], "ffn_moe_out-1" → float32 [n_tokens, n_embd]).
    """
    token_ids = [int(t) for t in token_ids]
    wanted = set(capture)
    captured: dict[str, np.ndarray] = {}

    @L.ggml_backend_sched_eval_callback
    def cb(tensor, ask, user_data):  # noqa: ARG001
        name = _Tensor.from_address(tensor).name.decode(errors="replace")
        if ask:
            return name in wanted
        if name in wanted:
            captured[name] = _copy_tensor(tensor)
        return True  # keep computing

    with _model(gguf_path) as model, _context(model, len(token_ids), cb if wanted else None, flash_attn) as ctx:
        _decode(ctx, token_ids, 0, all_logits=True)
        nv = _n_vocab(model)
        logits = np.stack([_logits(ctx, i, nv) for i in range(len(token_ids))])
    del cb  # the context that referenced it is freed
    missing = wanted - captured.keys()
    if missing:
        raise KeyError(f"tensors not seen in llama.cpp's graph: {sorted(missing)}")
    return logits, captured


def run_llama_chunks(gguf_path, chunks) -> np.ndarray:
    """llama.cpp's logits of every token of `chunks` (lists of token ids) decoded one after another into the same
    KV cache, as a prompt and then decode steps: float32 [total tokens, n_vocab]."""
    chunks = [[int(t) for t in c] for c in chunks]
    out, pos = [], 0
    with _model(gguf_path) as model, _context(model, sum(map(len, chunks))) as ctx:
        nv = _n_vocab(model)
        for c in chunks:
            _decode(ctx, c, pos, all_logits=True)
            out += [_logits(ctx, i, nv) for i in range(len(c))]
            pos += len(c)
    return np.stack(out)


def greedy_tokens(gguf_path, prompt_ids, n: int, stop_at_eog: bool = False) -> list[int]:
    """Greedy (argmax) continuation of `prompt_ids` by llama.cpp: the `n` new token ids (prompt excluded)."""
    prompt_ids = [int(t) for t in prompt_ids]
    out: list[int] = []
    with _model(gguf_path) as model, _context(model, len(prompt_ids) + n) as ctx:
        nv, vocab = _n_vocab(model), L.llama_model_get_vocab(model)
        _decode(ctx, prompt_ids, 0, all_logits=False)
        pos = len(prompt_ids)
        for _ in range(n):
            tok = int(np.argmax(_logits(ctx, -1, nv)))
            out.append(tok)
            if stop_at_eog and L.llama_vocab_is_eog(vocab, tok):
                break
            _decode(ctx, [tok], pos, all_logits=False)
            pos += 1
    return out


def llama_tokenize(gguf_path, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """Tokenize `text` with the GGUF's vocabulary in llama.cpp (vocab-only load)."""
    L.llama_backend_init()
    _quiet_llama_log()
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp failed to load {gguf_path}")
    try:
        vocab = L.llama_model_get_vocab(model)
        data = text.encode()
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])
    finally:
        L.llama_model_free(model)


def rel_diff(got, ref) -> float:
    """max |got - ref| / std(ref): the logit tolerance measure the architecture tests use."""
    return float(np.abs(got - ref).max() / ref.std())


def logits_and_routing(path, text: str, engine: str):
    """(ids, our logits, llama.cpp's logits, per-token mask: every MoE layer picked the same experts) for `text`."""
    import moecli

    m = moecli.load(path, engine=engine, flash_attn=False)
    ids = m.tokenize(text)
    picks = {}
    m.transformer.on_router = lambda l, probs, i, w: picks.setdefault(l, i.clone())
    got = m.logits(ids)
    from moecli.models.spec import moe_layer

    layers = [l for l in range(m.config.n_layer) if moe_layer(m.config, l)]  # leading dense, interleaved (llama4)
    ref, cap = run_llama(path, ids, capture=[f"ffn_moe_topk-{l}" for l in layers])
    assert sorted(picks) == list(layers)  # dense layers route nothing, a NextN layer does not run
    same = np.ones(len(ids), dtype=bool)
    for l in layers:  # compared as sets: equal scores may come out in another order
        same &= (np.sort(picks[l].numpy(), 1) == np.sort(cap[f"ffn_moe_topk-{l}"], 1)).all(1)
    return ids, got, ref, same
