"""Synthetic models: a tiny offline BPE tokenizer and random-weight GGUF files that llama.cpp loads.

Used by the test suite (tiny models, oracles) and by benchmarks (real geometries, few layers).
Tensor names, shapes and metadata keys follow what llama.cpp 0.3.36's loader expects (FACTS §2).
numpy shapes are ggml `ne` reversed: a ggml {n_embd, ff, E} expert tensor is numpy (E, ff, n_embd).
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token to a few
experts out of many, so only a small part of the weights is read for each token. The router is a small
linear layer followed by a softmax; the top experts are chosen and their outputs are added together,
weighted by the router's probabilities. When the experts do not fit in the memory of the graphics card,
some of them stay in the main memory of the computer and run on the processor instead. Moving an expert
over the bus takes time, and so does computing it on the processor, so a good scheduler decides, layer by
layer, which expert runs where. Hello, world! How are you today? I am fine, thank you, and you?
Once upon a time there was a little model that wanted to speak. It read many books and learned the words
of the people: the sun, the moon, the sea, the mountains and the rivers. In the morning it said hello to
everyone, and in the evening it told stories about the stars. Numbers like 1, 2, 3, 42, 100 and 2025
appear in text too, as do questions: what is the time? where is the station? why is the sky blue?
The user asks a question and the assistant answers it in a short and clear way.
"""

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # llama.cpp's llama_token_type values


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int, specials: tuple[str, ...] = SPECIAL_TOKENS) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2 byte-level pre-tokenizer with its regex == llama.cpp's "gpt-2" pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 384):
    """Deterministic byte-level BPE (ids 0..2 are the specials), trained at call time, cached in-process.

    No post-processor: encode() adds no BOS/EOS, like llama.cpp with add_bos_token = false.
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json(vocab_size))


@dataclasses.dataclass(frozen=True)
class SynthDims:
    n_vocab: int = 512            # embedding rows; the tokenizer's list is padded up to this
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 256               # dense FFN, or per-expert FFN when n_expert > 0
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_shexp: int = 0           # qwen2moe shared expert FFN
    context_length: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False  # honoured for llama and qwen3moe (output.weight omitted)
    attn_bias: bool = False       # qwen2moe q/k/v bias
    chat: str = "chatml"          # the tokenizer's specials and chat template: "chatml" or "harmony" (gpt-oss)
    n_dense: int = 0              # leading dense layers (FFN n_ff_dense), where the family has them
    n_ff_dense: int = 0
    extra: tuple = ()             # (ModelConfig field, value) pairs a family applies last (partial rotary...)


def geometry(name: str, n_layer: int = 2, n_vocab: int | None = None) -> SynthDims:
    """SynthDims of a real model's geometry (moecli.policy.geometry.REAL_MODELS) with `n_layer` layers (rope/eps
    as in the real configs; leading dense layers kept, at most n_layer - 1)."""
    from moecli.policy.geometry import REAL_MODELS

    if name not in REAL_MODELS:
        raise KeyError(f"unknown geometry {name!r}; known: {', '.join(REAL_MODELS)}")
    r = REAL_MODELS[name]
    d = _DIMS.get(r.arch, SynthDims)(**r.dims)
    fields = dict(n_layer=n_layer, n_vocab=n_vocab or d.n_vocab)
    if hasattr(d, "n_dense"):
        fields["n_dense"] = min(d.n_dense, max(n_layer - 1, 0))
    return dataclasses.replace(d, **fields)


def geometry_arch(name: str) -> str:
    """GGUF architecture of a geometry preset."""
    from moecli.policy.geometry import REAL_MODELS

    return REAL_MODELS[name].arch


# ---------------------------------------------------------------------------------------------- tensor plan

def _family(arch: str):
    from moecli.models.loader import GGUF_ARCHS

    if arch not in GGUF_ARCHS:
        raise ValueError(f"arch must be one of {tuple(GGUF_ARCHS)}, got {arch!r}")
    return GGUF_ARCHS[arch]


def config(arch: str, d) -> "ModelConfig":  # noqa: F821
    """The config a synthetic file of `arch` with dims `d` (SynthDims, or a ModelConfig as it is) loads into."""
    from moecli.models.config import ModelConfig

    if isinstance(d, ModelConfig):
        return d
    family = _family(arch)  # a family file for several architectures (qwen3next, qwen35moe) is told which
    return family.synth_config(d, arch) if arch in getattr(family, "ARCHS", ()) else family.synth_config(d)


def _plan(arch: str, d) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, init kind) in file order, from the family's layer spec. kinds: embd, embd_tied, norm, w
    (fan_in = last dim), out, bias, router, shgate, and per family (wk_b, exp_bias, w_oai, sinks: unscaled N(0, 1))."""
    from moecli.models.spec import plan

    return plan(_family(arch).SPEC, config(arch, d))


_CHUNK = 1 << 24  # elements per generated slice (64 MiB of float32)


def _slices(name: str, shape: tuple[int, ...]) -> list[tuple[list[int], tuple[int, ...]]]:
    """(seed suffix, numpy shape) of each slice of a tensor: one expert of a 3-D stack, blocks of rows of a big 2-D
    tensor (embeddings, output), else the whole tensor. Slices are whole rows, so each quantizes on its own."""
    if len(shape) == 3:
        return [([e], shape[1:]) for e in range(shape[0])]
    if len(shape) == 2 and shape[0] * shape[1] > _CHUNK:
        rows = max(1, _CHUNK // shape[1])
        return [([1 << 20, b], (min(rows, shape[0] - r), shape[1])) for b, r in enumerate(range(0, shape[0], rows))]
    return [([], shape)]


def _slice_data(seed: int, name: str, shape: tuple[int, ...], kind: str, sub: list[int],
                shp: tuple[int, ...]) -> np.ndarray:
    """Random float32 data of one slice of a tensor (see `_chunks`)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())] + sub)
    x = rng.standard_normal(shp, dtype=np.float32)
    if kind == "norm":
        x = 1.0 + 0.1 * x
    elif kind == "bias":
        x *= 0.1
    elif kind == "router":
        x *= 3.0 / np.sqrt(shp[-1])
    elif kind == "shgate":
        x *= 1.0 / np.sqrt(shp[-1])
    elif kind == "w":
        x *= 1.0 / np.sqrt(shp[-1])
    elif kind == "out":
        x *= 3.0 / np.sqrt(shp[-1])
    elif kind == "embd_tied":
        x *= 0.1
    elif kind == "wk_b":  # deepseek2 k_b decompresses the latent: its fan-in is the middle dim
        x *= 1.0 / np.sqrt(shape[1])
    elif kind == "exp_bias":  # deepseek2 selection bias, comparable to the sigmoid scores' spread
        x *= 0.05
    elif kind == "ssm_a":  # DeltaNet's -exp(A_log): negative decay rates around -1
        x = -np.exp(0.5 * x)
    elif kind == "rope_freqs":  # llama3/4-style long-context factors: 1 and above
        x = 1.0 + 3.0 * np.abs(x)
    elif kind == "w_oai":  # gpt-oss expert gate/up: wide enough that the +-7 clamps of its SwiGLU bite
        x *= 4.0 / np.sqrt(shp[-1])
    return x


def _chunks(seed: int, name: str, shape: tuple[int, ...], kind: str):
    """Random float32 data of one tensor, yielded in slices (one expert, or blocks of rows) to bound RAM.

    Seeded by (seed, name, slice) so a tensor's values do not depend on which other tensors exist.
    Scale: weights N(0, 1/fan_in) keep activations O(1). The embedding is N(0, 1) so tokens stay distinct
    (balanced routing: attention outputs alone are alike across tokens); when tied it is N(0, 0.01) instead,
    or the model only echoes its input token (tied logits std ≈ 1.6). output.weight is N(0, 9/n_embd) so
    logits are peaked (std ≈ 3). The router's N(0, 9/n_embd) makes routing decisive.
    """
    for sub, shp in _slices(name, shape):
        yield _slice_data(seed, name, shape, kind, sub, shp)


# ---------------------------------------------------------------------------------------------- metadata

def _metadata(w, arch: str, d, ftype_id: int) -> None:
    """The family's GGUF keys for the config of `d` (`to_gguf`, the inverse of its from_gguf) and the tokenizer."""
    import gguf

    c = config(arch, d)
    w.add_string("general.name", f"moecli-synth-{arch}")
    w.add_uint32("general.file_type", ftype_id)
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    for key, v in _family(arch).to_gguf(c).items():
        key = f"{arch}.{key}"
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, (list, tuple)):  # int arrays (qwen35moe's rope.dimension_sections)
            w.add_array(key, [int(x) for x in v])
        else:
            w.add_string(key, v)
    if getattr(d, "chat", "chatml") == "harmony":  # gpt-oss: its control tokens and template, <|return|> ends
        from moecli.chat import harmony

        _add_tokenizer(w, c.n_vocab, SPECIAL_TOKENS + harmony.SPECIAL_TOKENS, harmony.TEMPLATE, eos="<|return|>")
    else:
        _add_tokenizer(w, c.n_vocab)


def _add_tokenizer(w, n_vocab: int, specials: tuple[str, ...] = SPECIAL_TOKENS, template: str = CHATML_TEMPLATE,
                   eos: str = "<|endoftext|>") -> None:
    spec = json.loads(_tokenizer_json(384 + len(specials) - len(SPECIAL_TOKENS), specials))
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab {n_vocab} < tokenizer size {len(tokens)}")
    types = [TOKEN_CONTROL if t in specials else TOKEN_NORMAL for t in tokens]
    pad = n_vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [TOKEN_UNUSED] * pad
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    eot = vocab["<|endoftext|>"]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", eot)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab[eos])
    w.add_uint32("tokenizer.ggml.padding_token_id", eot)
    # Explicit so that llama_tokenize(add_special=True) equals tokenizers' encode() (no BOS/EOS added).
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_string("tokenizer.chat_template", template)


# ---------------------------------------------------------------------------------------------- writing

# Every ftype is written in one pass, slice by slice (no F32 temporary). F16, BF16, Q8_0 and MXFP4_MOE go through
# gguf.quants (numpy); the other types through ggml's quantizer (ggml_quantize_chunk, what llama_model_quantize
# calls) with llama.cpp's per-tensor type choice (`tensor_types`), so a file equals, tensor by tensor, what
# llama_model_quantize makes of the F32 one (tests/test_synth_presets.py checks it).
_NUMPY = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "MXFP4_MOE": "Q8_0"}
# Uniform types (llama_model_quantize with pure=True): the type each quantizable tensor gets.
_PURE = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q3_K": "Q3_K",
         "Q4_K": "Q4_K", "Q5_K": "Q5_K", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}
# llama.cpp's mixes: the default type, which `_mix_type` raises for some roles.
_MIX = {"Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
        "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}
FTYPES = tuple(_NUMPY) + tuple(_PURE) + tuple(_MIX)
# general.file_type (llama.cpp's LLAMA_FTYPE_*); the uniform K types as llama_model_quantize labels them
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
             "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
             "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32, "MXFP4_MOE": 38, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17}
# A type whose block does not divide a tensor's rows falls back to a 32-block one (llama.cpp's rule), else F16.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    # llama.cpp's quantizer rule for the tensors these families have: 1-D tensors (norms), biases (gpt-oss's expert
    # biases are 2-D), norms, the router and DeltaNet's short convolution stay F32.
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and "ssm_conv1d" not in name)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's "use more bits" layers: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_ATTN_V = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")  # llama.cpp's attention-v-like roles


def _mix_type(name: str, ftype: str, base: str, n_expert: int, n_layer: int, i_v: int, n_v: int) -> str:
    """The type llama.cpp's K-quant mix `ftype` gives one tensor (llama_tensor_get_type_impl, for the roles these
    families have; the output head and a tied embedding are decided by the caller). i_v / n_v: this tensor's rank
    among the attention-v-like tensors in llama.cpp's order, and their count; n_layer: block_count."""
    if name == "token_embd.weight":
        return base
    if any(k in name for k in _ATTN_V):
        t = base
        if ftype == "Q3_K_M":
            t = "Q5_K" if i_v < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i_v, n_v):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i_v < 4:
            t = "Q5_K"
        return "Q8_0" if n_expert == 8 else t
    if "attn_k.weight" in name:
        return "Q8_0" if n_expert == 8 else base
    if "attn_output.weight" in name:
        if n_expert == 8:
            return "Q5_K" if ftype in ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else base
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, base)
    if "ffn_down" in name and "ffn_up" not in name and "ffn_gate" not in name:
        i = int(name.split(".")[1])
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n_layer // 16 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if _more_bits(i, n_layer) else base
        if ftype == "Q4_K_S":
            return "Q5_K" if i < n_layer // 8 else base
    return base


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's loader orders tensors by layer (globals first), then by name."""
    return (int(name.split(".")[1]) if name.startswith("blk.") else -1, name)


def tensor_types(arch: str, d, ftype: str) -> dict[str, str]:
    """The GGML type of every tensor a synthetic file of `arch`/`d` in `ftype` holds (names as in `_plan`)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    ftype = ftype.upper()
    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {FTYPES}, got {ftype!r}")
    plan = _plan(arch, d)
    base = _NUMPY.get(ftype) or _PURE.get(ftype) or _MIX[ftype]
    meta = _family(arch).to_gguf(config(arch, d))
    n_expert, n_layer = int(meta.get("expert_count", 0)), int(meta["block_count"])
    tied = not any(name == "output.weight" for name, _, _ in plan)
    attn_v = [n for n in sorted((n for n, _, _ in plan), key=_llama_order) if any(k in n for k in _ATTN_V)]
    out = {}
    for name, shape, _ in plan:
        if ftype == "F32" or not _quantizable(name, shape):
            out[name] = "F32"
            continue
        if ftype in _NUMPY:
            out[name] = "MXFP4" if ftype == "MXFP4_MOE" and name.endswith("_exps.weight") else base
            continue
        t = base
        if ftype in _MIX and (name == "output.weight" or tied and name == "token_embd.weight"):
            t = "Q8_0" if shape[-1] % GGML_QUANT_SIZES[Q[base]][0] else "Q6_K"  # the head: more bits
        elif ftype in _MIX:
            i_v = attn_v.index(name) if name in attn_v else 0
            t = _mix_type(name, ftype, base, n_expert, n_layer, i_v, len(attn_v))
        if shape[-1] % GGML_QUANT_SIZES[Q[t]][0]:
            t = _FALLBACK.get(t, t)
            if shape[-1] % GGML_QUANT_SIZES[Q[t]][0]:
                t = "F16"
        out[name] = t
    return out


def tensor_bytes(arch: str, d, ftype: str) -> int:
    """Bytes of tensor data a synthetic file holds (the file is this plus metadata and padding)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    types = tensor_types(arch, d, ftype)
    total = 0
    for name, shape, _ in _plan(arch, d):
        block, size = GGML_QUANT_SIZES[Q[types[name]]]
        total += int(np.prod(shape)) // block * size
    return total


def write_gguf(path, arch: str, dims: SynthDims, seed: int = 0, ftype: str = "F32",
               progress: Callable[[int], None] | None = None, threads: int | None = None) -> Path:
    """Write a random-weight GGUF model of `arch` with `dims` in `ftype`; returns the path. Streams slice by slice
    (RAM stays at a few slices whatever the model's size); `progress(n)` gets each slice's bytes as it is written;
    `threads` generate and quantize slices in parallel (numpy and ggml release the GIL)."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    path, ftype = Path(path), ftype.upper()
    types = tensor_types(arch, dims, ftype)
    plan = _plan(arch, dims)
    w = gguf.GGUFWriter(path, arch)
    _metadata(w, arch, dims, FILE_TYPE[ftype])
    for name, shape, _ in plan:
        t = gguf.GGMLQuantizationType[types[name]]
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            bshape = quant_shape_to_byte_shape(shape, t)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    encode = _encode_numpy if ftype in _NUMPY else _encode_ggml
    n_threads = max(1, threads or min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        for name, shape, kind in plan:
            # each tensor's slices straight to the file (GGUFWriter.write_tensor_data wants a whole array)
            ti = w.tensors[0].pop(name)
            w.write_padding(fout, fout.tell())
            t = gguf.GGMLQuantizationType[types[name]]
            n = _write_tensor(pool, fout, seed, name, shape, kind, t, encode, 2 * n_threads, progress)
            assert n == ti.nbytes, (name, n, ti.nbytes)
            w.write_padding(fout, n)
    w.close()
    return path


def _write_tensor(pool, fout, seed, name, shape, kind, t, encode, window: int, progress) -> int:
    """Generate, encode and write one tensor's slices in order, at most `window` of them in flight."""
    pending: collections.deque = collections.deque()
    n = 0

    def job(sub, shp):
        return encode(_slice_data(seed, name, shape, kind, sub, shp), t)

    def drain_one():
        nonlocal n
        y = pending.popleft().result()
        y.tofile(fout)
        n += y.nbytes
        if progress is not None:
            progress(y.nbytes)

    for sub, shp in _slices(name, shape):
        if len(pending) >= window:
            drain_one()
        pending.append(pool.submit(job, sub, shp))
    while pending:
        drain_one()
    return n


def _encode_numpy(x: np.ndarray, t) -> np.ndarray:
    from gguf.quants import quantize

    return x if t.name == "F32" else quantize(x, t)


def _encode_ggml(x: np.ndarray, t) -> np.ndarray:
    if t.name == "F32":
        return x
    from moecli.kernels import ggml

    return ggml.quantize(x, int(t))


def _lib():
    import llama_cpp.llama_cpp as L

    return L


def llama_quantize(src, dst, llama_ftype: str, pure: bool = False, nthread: int = 0) -> None:
    """Quantize a GGUF with llama.cpp (`llama_ftype` is the LLAMA_FTYPE_MOSTLY_* suffix, e.g. "Q4_K_M")."""
    L = _lib()
    _quiet_llama_log()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{llama_ftype}")
    params.pure = pure
    params.nthread = nthread or (os.cpu_count() or 1)
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {llama_ftype}) failed with {rc}")


_LOG_CB = None


def _quiet_llama_log() -> None:
    """Route llama.cpp's log to stderr only when MOECLI_VERBOSE / MOECLI_TEST_VERBOSE is set."""
    global _LOG_CB
    if _LOG_CB is not None:
        return
    L = _lib()
    loud = bool(os.environ.get("MOECLI_VERBOSE") or os.environ.get("MOECLI_TEST_VERBOSE"))

    @L.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        if loud:
            os.write(2, text)

    _LOG_CB = cb  # keep the ctypes callback alive
    L.llama_log_set(cb, ctypes.c_void_p(0))


def write_f32_twin(src_gguf, dst_gguf) -> Path:
    """Copy a GGUF with every tensor dequantized to F32 (metadata copied, file_type set to ALL_F32)."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(src_gguf)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst_gguf, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_uint32(key, 0)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for t in r.tensors:  # streamed per expert for 3-D tensors (as in _write_direct)
        ti = w.tensors[0].pop(t.name)
        w.write_padding(fout, fout.tell())
        n = 0
        for part in (t.data if len(t.shape) == 3 else [t.data]):
            x = np.ascontiguousarray(dequantize(part, t.tensor_type), dtype=np.float32)
            x.tofile(fout)
            n += x.nbytes
        assert n == ti.nbytes, (t.name, n, ti.nbytes)
        w.write_padding(fout, n)
    w.close()
    return Path(dst_gguf)


# ---------------------------------------------------------------------------------------------- deepseek2
# DeepSeek-V2 / V2-Lite / V3 (llama.cpp arch "deepseek2"): MLA attention, leading dense layers, shared experts,
# softmax or sigmoid(+bias, groups) routing, optional YaRN. The generic writers above dispatch here.

@dataclasses.dataclass(frozen=True)
class DeepSeekDims(SynthDims):
    """SynthDims plus the deepseek2 geometry. n_ff is the per-expert FFN; head_dim is unused (qk_nope + qk_rope)."""
    q_lora_rank: int = 0            # 0: plain attn_q (V2-Lite)
    kv_lora_rank: int = 256
    qk_nope: int = 64
    qk_rope: int = 32
    v_head_dim: int = 64
    n_dense: int = 1                # leading dense layers (FFN n_ff_dense)
    n_ff_dense: int = 512
    n_shared: int = 2               # shared experts (width n_shared * n_ff)
    gating: str = "softmax"         # or "sigmoid"
    expert_bias: bool = False       # exp_probs_b (V3)
    n_group: int = 0
    topk_group: int = 0
    weights_norm: bool = False
    weights_scale: float = 1.0
    mla_split: bool = False         # attn_k_b / attn_v_b + key_length_mla (newer GGUFs) instead of attn_kv_b
    yarn_factor: float = 0.0        # > 0: YaRN RoPE scaling
    yarn_orig_ctx: int = 256
    yarn_mscale_all_dim: float = 0.707


# ---------------------------------------------------------------------------------------------- gpt-oss
# gpt-oss-20b / 120b (llama.cpp arch "gpt-oss"): biased attention with sinks, sliding window on even layers,
# biased experts with the clamped SwiGLU, YaRN. Write with ftype "MXFP4_MOE" for MXFP4 experts (as shipped).

@dataclasses.dataclass(frozen=True)
class GptOssDims(SynthDims):
    """SynthDims plus gpt-oss's geometry; n_ff is the per-expert FFN."""
    sliding_window: int = 128
    chat: str = "harmony"
    yarn_factor: float = 32.0       # > 0: YaRN
    yarn_orig_ctx: int = 4096


_DIMS = {"deepseek2": DeepSeekDims, "gpt-oss": GptOssDims}  # families whose synthetic dims have fields of their own
