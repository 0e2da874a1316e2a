"""Checkpoint file -> Checkpoint (typed config + canonical tensors), dispatching on the architecture."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.gguf import GGUFFile
from moecli.formats.safetensors import SafetensorsModel
from moecli.models import deepseek2, glm4moe, gpt_oss, llama, llama4, minimax_m2, olmoe, qwen2moe, qwen3moe, \
    qwen3next, smallthinker, spec
from moecli.models import validate as checks
from moecli.models.common import ggml_tensor_of
from moecli.models.config import Checkpoint, ExpertStack

# GGUF `general.architecture` -> family module.
GGUF_ARCHS = {"llama": llama, "qwen2moe": qwen2moe, "qwen3moe": qwen3moe, "olmoe": olmoe, "deepseek2": deepseek2,
              "gpt-oss": gpt_oss, "glm4moe": glm4moe, "smallthinker": smallthinker, "llama4": llama4,
              "minimax-m2": minimax_m2, "qwen3next": qwen3next, "qwen35moe": qwen3next}
# Hugging Face `model_type` -> family module.
HF_ARCHS = {"llama": llama, "mistral": llama, "mixtral": llama, "qwen2_moe": qwen2moe, "qwen3_moe": qwen3moe,
            "olmoe": olmoe, "gpt_oss": gpt_oss, "deepseek_v2": deepseek2, "deepseek_v3": deepseek2, "glm4_moe": glm4moe,
            "minimax_m2": minimax_m2, "qwen3_next": qwen3next, "qwen3_5_moe": qwen3next, "qwen3_5_moe_text": qwen3next,
            "llama4": llama4, "llama4_text": llama4}
# Multimodal wrappers moecli runs the language model of: its config is config.json's `text_config` (the vision
# tower's tensors match no name and are skipped).
HF_TEXT_CONFIG = {"qwen3_5_moe", "llama4"}
_EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise MoecliError(f"{path}: no such file or directory")
    if path.is_dir():
        ckpt = _from_hf(SafetensorsModel(path))
    else:
        ckpt = _from_gguf(GGUFFile(path))
    validate(ckpt)
    return ckpt


def _from_gguf(g: GGUFFile) -> Checkpoint:
    family = GGUF_ARCHS.get(g.arch)
    if family is None:
        raise UnsupportedError(f"{g.path.name}: unsupported architecture '{g.arch}' "
                               f"(supported: {', '.join(sorted(GGUF_ARCHS))})")
    checks.gguf_metadata(g)  # types and vocabulary before the family reads a key
    cfg = family.from_gguf(g)
    checks.config(cfg, checks.layers_present(g.tensors), g.path.name)  # before any per-layer loop
    experts = {}
    for l in range(cfg.n_layer):
        for kind in _EXPS:
            t = g.tensors.get(f"blk.{l}.{kind}.weight")
            if t is not None:
                experts[f"blk.{l}.{kind}"] = ExpertStack(stacked=t, bias=g.tensors.get(f"blk.{l}.{kind}.bias"))
    return Checkpoint(cfg, dict(g.tensors), experts, g.file_bytes, g)


def _from_hf(m: SafetensorsModel) -> Checkpoint:
    checks.hf_config(m.config, f"{m.path.name}/config.json")
    model_type = m.config.get("model_type", "?")
    family = HF_ARCHS.get(model_type)
    if family is None:
        raise UnsupportedError(f"{m.path.name}: unsupported architecture '{model_type}' "
                               f"(supported: {', '.join(sorted(HF_ARCHS))})")
    cfg = family.from_hf(_text_config(m.config, model_type, m.path.name))
    checks.config(cfg, checks.layers_present(m.tensors), f"{m.path.name}/config.json", hf=True)
    tensors, per_expert = {}, {}
    for name, t in m.tensors.items():
        new = rename_hf(name, family.HF_NAMES)
        if new is None:
            continue  # e.g. rotary inv_freq buffers
        layer = re.match(r"blk\.(\d+)\.", new)
        if layer and int(layer[1]) >= cfg.n_layer:
            continue  # DeepSeek-V3's multi-token-prediction layer 61: not part of the forward pass
        e = re.fullmatch(r"(blk\.\d+\.ffn_(?:gate|up|down)_exps)\.(\d+)", new)
        if e:
            per_expert.setdefault(e[1], {})[int(e[2])] = t
        else:
            tensors[new] = _f32_if_1d(t)
    if hasattr(family, "hf_tensors"):  # values the GGUF side stores transformed (qwen3next's norms, A_log, ...)
        tensors = family.hf_tensors(tensors, cfg)
    experts = family.hf_experts(m, cfg) if hasattr(family, "hf_experts") else {}  # fused layouts (gpt-oss, Qwen3.5)
    for key, by_id in per_expert.items():
        if sorted(by_id) != list(range(cfg.n_expert)):
            raise MoecliError(f"{m.path.name}: {key} has experts {sorted(by_id)[:8]}..., expected {cfg.n_expert}")
        experts[key] = ExpertStack(experts=[by_id[i] for i in range(cfg.n_expert)])
    return Checkpoint(cfg, tensors, experts, m.file_bytes, m)


def _text_config(cfg: dict, model_type: str, name: str) -> dict:
    if model_type not in HF_TEXT_CONFIG:
        return cfg
    text = cfg.get("text_config")
    if text is None:
        raise MoecliError(f"{name}/config.json: a {model_type} config needs text_config (the language model's)")
    # the wrapper's own tie_word_embeddings is the one transformers honours
    text = {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
    checks.hf_config(text, f"{name}/config.json text_config")
    return text


def _f32_if_1d(t):
    """A 16-bit 1-D tensor (norm weights, biases; bf16 in most released checkpoints) as F32, as GGUF converters
    store them: ggml's binary ops (the norm's multiply, the bias add) take no bf16 / f16 operand. A small copy."""
    if len(t.ne) != 1 or t.type not in (T.BF16, T.F16):
        return t
    return ggml_tensor_of(t.name, T.F32, t.ne, t.numpy().astype(np.float32))


def rename_hf(name: str, table: list[tuple[str, str]]) -> str | None:
    """Hugging Face tensor name -> canonical (GGUF) name through the family's (regex, template) table."""
    for pattern, template in table:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(template)
    return None


def validate(ckpt: Checkpoint) -> None:
    """Check every tensor of the family's layer spec against the config, naming the first that disagrees."""
    spec.validate(ckpt, GGUF_ARCHS[ckpt.config.arch].SPEC)
