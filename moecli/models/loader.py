"""Checkpoint file -> Checkpoint (typed config + canonical tensors), dispatching on the architecture."""
from __future__ import annotations

import re
from pathlib import Path

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.gguf import GGUFFile
from moecli.formats.safetensors import SafetensorsModel
from moecli.models import deepseek2, gpt_oss, llama, olmoe, qwen2moe, qwen3moe, validate as checks
from moecli.models.config import Checkpoint, ExpertStack

# GGUF `general.architecture` -> family module.
GGUF_ARCHS = {"llama": llama, "qwen2moe": qwen2moe, "qwen3moe": qwen3moe, "olmoe": olmoe, "deepseek2": deepseek2,
              "gpt-oss": gpt_oss}
# Hugging Face `model_type` -> family module.
HF_ARCHS = {"llama": llama, "mistral": llama, "mixtral": llama, "qwen2_moe": qwen2moe, "qwen3_moe": qwen3moe,
            "olmoe": olmoe, "gpt_oss": gpt_oss, "deepseek_v2": deepseek2, "deepseek_v3": deepseek2}
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
    cfg = family.from_hf(m.config)
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
            tensors[new] = t
    experts = family.hf_experts(m, cfg) if hasattr(family, "hf_experts") else {}  # fused layouts (gpt-oss)
    for key, by_id in per_expert.items():
        if sorted(by_id) != list(range(cfg.n_expert)):
            raise MoecliError(f"{m.path.name}: {key} has experts {sorted(by_id)[:8]}..., expected {cfg.n_expert}")
        experts[key] = ExpertStack(experts=[by_id[i] for i in range(cfg.n_expert)])
    return Checkpoint(cfg, tensors, experts, m.file_bytes, m)


def rename_hf(name: str, table: list[tuple[str, str]]) -> str | None:
    """Hugging Face tensor name -> canonical (GGUF) name through the family's (regex, template) table."""
    for pattern, template in table:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(template)
    return None


def validate(ckpt: Checkpoint) -> None:
    """Check every tensor the forward pass needs against the config, naming the first that disagrees."""
    family = GGUF_ARCHS.get(ckpt.config.arch)
    if hasattr(family, "validate"):  # families with their own tensor layout (deepseek2) validate themselves
        return family.validate(ckpt)
    c = ckpt.config
    q_out, kv_out = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    ckpt.check_shape("token_embd.weight", c.n_embd, c.n_vocab)
    ckpt.check_shape("output_norm.weight", c.n_embd)
    ckpt.check_shape("output.weight", c.n_embd, c.n_vocab, optional=True)
    for l in range(c.n_layer):
        b = f"blk.{l}."
        ckpt.check_shape(b + "attn_norm.weight", c.n_embd)
        ckpt.check_shape(b + "attn_q.weight", c.n_embd, q_out)
        ckpt.check_shape(b + "attn_k.weight", c.n_embd, kv_out)
        ckpt.check_shape(b + "attn_v.weight", c.n_embd, kv_out)
        ckpt.check_shape(b + "attn_output.weight", q_out, c.n_embd)
        ckpt.check_shape(b + "ffn_norm.weight", c.n_embd)
        if c.attn_bias:
            for p, n in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                ckpt.check_shape(b + f"attn_{p}.bias", n, optional=True)
        if c.qk_norm == "head":
            ckpt.check_shape(b + "attn_q_norm.weight", c.head_dim)
            ckpt.check_shape(b + "attn_k_norm.weight", c.head_dim)
        elif c.qk_norm == "full":
            ckpt.check_shape(b + "attn_q_norm.weight", q_out)
            ckpt.check_shape(b + "attn_k_norm.weight", kv_out)
        if not c.is_moe:
            ckpt.check_shape(b + "ffn_gate.weight", c.n_embd, c.n_ff)
            ckpt.check_shape(b + "ffn_up.weight", c.n_embd, c.n_ff)
            ckpt.check_shape(b + "ffn_down.weight", c.n_ff, c.n_embd)
            continue
        ckpt.check_shape(b + "ffn_gate_inp.weight", c.n_embd, c.n_expert)
        for kind, ne in (("ffn_gate_exps", (c.n_embd, c.n_ff_exp)), ("ffn_up_exps", (c.n_embd, c.n_ff_exp)),
                         ("ffn_down_exps", (c.n_ff_exp, c.n_embd))):
            stack = ckpt.experts.get(b + kind)
            if stack is None:
                raise MoecliError(f"model file lacks tensor {b}{kind}.weight")
            got = tuple(stack.stacked.ne) if stack.stacked is not None else (*stack.ne, stack.n)
            if got != (*ne, c.n_expert):
                raise MoecliError(f"tensor {b}{kind}.weight has shape {list(got)}, "
                                  f"expected {[*ne, c.n_expert]} from the model config")
        if c.n_ff_shexp:
            ckpt.check_shape(b + "ffn_gate_shexp.weight", c.n_embd, c.n_ff_shexp)
            ckpt.check_shape(b + "ffn_up_shexp.weight", c.n_embd, c.n_ff_shexp)
            ckpt.check_shape(b + "ffn_down_shexp.weight", c.n_ff_shexp, c.n_embd)
            gate = ckpt.optional(b + "ffn_gate_inp_shexp.weight")
            if c.shared_expert_gate and (gate is None or gate.ne[0] != c.n_embd or gate.n_elements != c.n_embd):
                ckpt.check_shape(b + "ffn_gate_inp_shexp.weight", c.n_embd)  # GGUF [n_embd]; HF [n_embd, 1]
