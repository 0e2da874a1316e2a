"""Qwen3-Next (`qwen3_next`) and Qwen3.5 / 3.6 MoE (`qwen3_5_moe`, the multimodal wrapper) safetensors in the Hugging
Face layout against transformers (fp32, eager): the zero-centred norms (1 + w), A_log -> -exp, the squeezed conv,
Qwen3-Next's fused in_proj_qkvz / in_proj_ba (grouped per k head), Qwen3.5's separate projections with the value
heads moved from transformers' grouped order to ggml's tiled broadcast, the vision tower and the MTP head skipped.

Fixtures (tests/hf_fixtures.py): the tiny GGUFs' dims, 2 k heads / 4 v heads, so the head order matters. transformers
writes per-expert tensors; the released Qwen3.5 checkpoints fuse them (mlp.experts.gate_up_proj / down_proj): both
spellings are run. Measured max |Δlogit| over prompt + decode steps (std of the logits ≈ 6): qwen3next torch 1.2e-4,
ggml 1.6e-4; qwen35moe torch 2.7e-4, ggml 4.4e-4 (relative 2e-5 .. 7.4e-5; the decode steps alone ≤ 1.1e-4).
transformers runs the prompt through its chunked delta rule (a WY form), moecli token by token: these sit above the
attention-only archs' 1e-5 relative.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_hf
from hf_fixtures import hf_logits

import moecli
from moecli.api import Session
from moecli.errors import MoecliError

ARCHS = ("qwen3next", "qwen35moe")
TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
N_DECODE = 4
TOL = 2e-4  # max |Δlogit| / std(logits), both engines (measured ≤ 7.3e-5)


def _rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / ref.std())


def _moecli_run(path, engine: str):
    """(ids, logits of the prompt then N_DECODE single-token steps through the cache, expert picks per layer)."""
    m = moecli.load(path, engine=engine, flash_attn=False)
    ids = m.tokenize(TEXT)
    picks = {}
    m.transformer.on_router = lambda l, probs, i, w: picks.setdefault(l, []).append(i.clone().numpy())
    session = Session(m, len(ids) + N_DECODE)
    prompt = ids[:-N_DECODE]
    steps = [m.transformer.forward(prompt, session.cache).numpy()]
    steps += [m.transformer.forward([t], session.cache).numpy() for t in ids[-N_DECODE:]]
    return ids, np.concatenate(steps), {l: np.concatenate(p) for l, p in picks.items()}


def _hf_picks(path, ids) -> dict:
    """transformers' top-k expert ids per MoE layer for `ids` (one pass), from its routers' outputs."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    picks = {}
    for l, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda mod, inp, out, l=l: picks.__setitem__(l, out[2].numpy()))
    with torch.no_grad():
        model(torch.tensor([ids]))
    return picks


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_experts_match_transformers(arch, engine):
    path = tiny_hf(arch)
    ids, got, picks = _moecli_run(path, engine)
    ref = hf_logits(path, ids)
    assert _rel(got, ref) < TOL, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    want = _hf_picks(path, ids)
    assert sorted(picks) == sorted(want) == list(range(moecli.load(path).config.n_layer))
    for l in want:  # as sets: equal scores may come out in another order
        assert (np.sort(picks[l], 1) == np.sort(want[l], 1)).all(), l


def test_config_mapping():
    from moecli.models.loader import load_checkpoint

    nxt, q35 = (load_checkpoint(tiny_hf(a)).config for a in ARCHS)
    assert (nxt.arch, nxt.recurrent_layers, nxt.rope_dim, nxt.ssm_groups, nxt.ssm_heads, nxt.ssm_state,
            nxt.n_ff_shexp, nxt.norm_topk, nxt.rope_sections) == ("qwen3next", (0, 2), 16, 2, 4, 64, 256, True, ())
    assert (q35.arch, q35.recurrent_layers, q35.rope_dim, q35.rope_sections, q35.n_layer) == \
        ("qwen35moe", (0, 1, 2), 32, (6, 5, 5, 0), 4)


def _released_qwen35(src, dst):
    """The tiny Qwen3.5 checkpoint as Qwen/Qwen3.5-35B-A3B ships: experts fused per layer (gate_up_proj [E, 2 ff, d],
    gate rows first; down_proj [E, d, ff]) and an MTP head (mtp.*) beside the text model."""
    from safetensors.numpy import load_file, save_file

    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    t = {}
    for f in src.glob("*.safetensors"):
        t.update(load_file(str(f)))
    out = {k: v for k, v in t.items() if ".mlp.experts." not in k}
    n_layer, n_expert = (json.loads((src / "config.json").read_text())["text_config"][k]
                         for k in ("num_hidden_layers", "num_experts"))
    for l in range(n_layer):
        p = f"model.language_model.layers.{l}.mlp.experts."
        e = lambda i, k: t[f"{p}{i}.{k}_proj.weight"]  # noqa: E731
        out[p + "gate_up_proj"] = np.stack([np.concatenate([e(i, "gate"), e(i, "up")]) for i in range(n_expert)])
        out[p + "down_proj"] = np.stack([e(i, "down") for i in range(n_expert)])
    out["mtp.fc.weight"] = np.ones((8, 16), np.float32)
    out["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = np.ones((4, 16), np.float32)
    save_file(out, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_released_fused_experts_spelling(tmp_path, engine):
    """Fused experts read as zero-copy per-expert views give the logits of the per-expert file, exactly."""
    src = tiny_hf("qwen35moe")
    fused = _released_qwen35(src, tmp_path)
    a, b = moecli.load(src, engine=engine), moecli.load(fused, engine=engine)
    ids = a.tokenize(TEXT)
    assert np.array_equal(a.logits(ids), b.logits(ids))
    if engine == "torch":  # transformers reads the fused spelling as it is
        assert _rel(b.logits(ids), hf_logits(fused, ids)) < TOL


def _edit(tmp_path, arch, change):
    src = tiny_hf(arch)
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    change(cfg.get("text_config", cfg))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("arch, key, value, match", [
    ("qwen3next", "linear_value_head_dim", 32, "linear_key_head_dim 64 != linear_value_head_dim 32"),
    ("qwen35moe", "linear_num_value_heads", 3, "not a multiple"),
    ("qwen35moe", "layer_types", ["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
     "layer_types must be 4 of"),
    ("qwen3next", "hidden_act", "gelu", "hidden_act"),
    ("qwen3next", "mlp_only_layers", [1], "dense layers"),
    ("qwen35moe", "linear_num_key_heads", "2", "linear_num_key_heads is '2', expected an integer"),
    ("qwen3next", "num_experts", 16, r"blk\.0\.ffn_\w+_exps"),
])
def test_hostile_config_is_one_clear_error(tmp_path, arch, key, value, match):
    path = _edit(tmp_path, arch, lambda c: c.__setitem__(key, value))
    with pytest.raises(MoecliError, match=match):
        moecli.load(path, engine="torch")


def test_wrapper_without_text_config_is_refused(tmp_path):
    path = _edit(tmp_path, "qwen35moe", lambda c: None)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["text_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoecliError, match="needs text_config"):
        moecli.load(path)
