"""DeepSeek-V2(-Lite) and V3 safetensors in the Hugging Face layout against transformers: MLA through kv_b_proj,
q LoRA or a plain q, YaRN with DeepSeek's mscale, a leading dense layer, shared experts, softmax (V2) or sigmoid +
e_score_correction_bias with grouped top-k and a routed scale (V3).

The fixture archs "deepseek2-lite" / "deepseek3" (tests/hf_fixtures.py, also in test_forward_transformers) plus
variants for what they leave out: V3 with YaRN (mscale 1.0, as V3 ships) and rope_interleave off (NEOX halves);
V2 with q LoRA, group_limited_greedy (groups scored by their best expert), a routed scale and YaRN without
truncation (transformers' `truncate: false`)."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import _lock, cache_dir, tiny_dims, tiny_hf
from hf_fixtures import hf_logits, write_hf

import moecli
from moecli.api import Session

TEXT = "Multi-head latent attention: one compressed KV per token, decompressed per head. Experts 2 of 8!"
ARCHS = ("deepseek2-lite", "deepseek3")
VARIANTS = {  # name -> (fixture arch, dims changes, config overrides)
    # as V3 ships: factor = max_position_embeddings / original_max_position_embeddings, mscale = mscale_all_dim = 1
    "v3-yarn-neox": ("deepseek3", dict(yarn_factor=4.0, yarn_orig_ctx=512, yarn_mscale_all_dim=1.0),
                     dict(rope_interleave=False)),
    # 16 experts in 4 groups, 2 kept, top-4: the group limit changes the choice of many tokens
    "v2-groups": ("deepseek2-lite", dict(q_lora_rank=128, n_expert=16, n_expert_used=4, n_group=4, topk_group=2,
                                         weights_scale=2.0),
                  dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 1.0,
                                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 256,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})),
}
_built = {}


def _path(name: str):
    if name in ARCHS:
        return tiny_hf(name)
    arch, dims, overrides = VARIANTS[name]
    with _lock:
        if name not in _built:
            _built[name] = write_hf(cache_dir() / f"hf-deepseek-{name}", arch,
                                    dataclasses.replace(tiny_dims(arch), **dims), 0, **overrides)
        return _built[name]


def _rel(got, ref):
    return float(np.abs(got - ref).max() / ref.std())


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_logits_match_transformers(name, engine):
    path = _path(name)
    m = moecli.load(path, engine=engine)
    ids = m.tokenize(TEXT)
    ref = hf_logits(path, ids)
    got = m.logits(ids)
    assert _rel(got, ref) < (1e-5 if engine == "torch" else 1e-4), _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_config_mapping():
    from moecli.models.loader import load_checkpoint

    def cfg(name):
        return load_checkpoint(_path(name)).config

    v2 = cfg("deepseek2-lite")
    assert (v2.arch, v2.q_lora_rank, v2.gating, v2.norm_topk, v2.n_group, v2.n_dense_layers, v2.n_shared,
            v2.n_ff_shexp, v2.expert_bias, v2.mla_split, v2.rope_neox) == \
        ("deepseek2", 0, "softmax", False, 1, 1, 2, 512, False, False, False)
    assert (v2.rope_scaling, v2.rope_factor, v2.yarn_orig_ctx, v2.yarn_log_mul, v2.yarn_truncate) == \
        ("yarn", 8.0, 256, 0.707, True)
    v3 = cfg("deepseek3")
    assert (v3.q_lora_rank, v3.gating, v3.expert_bias, v3.n_group, v3.topk_group, v3.group_score, v3.norm_topk,
            v3.routed_scale, v3.rope_neox, v3.rope_scaling) == \
        (256, "sigmoid", True, 4, 2, "top2", True, 2.5, False, None)
    neox = cfg("v3-yarn-neox")
    assert (neox.rope_neox, neox.rope_factor, neox.yarn_orig_ctx, neox.yarn_log_mul) == (True, 4.0, 512, 1.0)
    groups = cfg("v2-groups")
    assert (groups.q_lora_rank, groups.n_group, groups.topk_group, groups.group_score, groups.routed_scale,
            groups.yarn_truncate) == (128, 4, 2, "max", 2.0, False)


def test_config_refusals_and_defaults():
    from moecli.errors import MoecliError, UnsupportedError
    from moecli.models.deepseek2 import from_hf

    base = dict(model_type="deepseek_v3", vocab_size=512, hidden_size=256, num_hidden_layers=4,
                num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128)
    c = from_hf(base)  # transformers' DeepseekV3Config defaults for what is left out
    assert (c.q_lora_rank, c.n_shared, c.n_dense_layers, c.routed_scale, c.n_group, c.topk_group, c.norm_topk,
            c.rope_neox) == (1536, 1, 3, 2.5, 8, 4, True, False)
    v2 = from_hf({**base, "model_type": "deepseek_v2", "q_lora_rank": None})
    assert (v2.q_lora_rank, v2.n_shared, v2.n_dense_layers, v2.routed_scale, v2.n_group, v2.gating) == \
        (0, 2, 0, 1.0, 1, "softmax")
    yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    for bad in ({"rope_scaling": {**yarn, "mscale": 1.0, "mscale_all_dim": 0.707}},
                {"rope_scaling": yarn},  # no mscale_all_dim: transformers scales the cos/sin, not DeepSeek's form
                {"rope_scaling": {**yarn, "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 0.5}},
                {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                {"attention_bias": True}, {"hidden_act": "gelu"}, {"num_key_value_heads": 1}):
        with pytest.raises(UnsupportedError):
            from_hf({**base, **bad})
    with pytest.raises(UnsupportedError, match="topk_method"):
        from_hf({**base, "model_type": "deepseek_v2", "topk_method": "noaux_tc"})
    with pytest.raises(MoecliError, match="kv_lora_rank"):
        from_hf({k: v for k, v in base.items() if k != "kv_lora_rank"})
    ok = from_hf({**base, "rope_scaling": {**yarn, "mscale": 1.0, "mscale_all_dim": 1.0}, "rope_theta": 5e4})
    assert (ok.rope_scaling, ok.rope_factor, ok.yarn_orig_ctx, ok.yarn_log_mul, ok.rope_theta) == \
        ("yarn", 40.0, 4096, 1.0, 5e4)


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decode_equals_one_shot(arch, engine):
    """A prompt prefilled through a Session's cache, then one token at a time: the one-shot logits."""
    m = moecli.load(tiny_hf(arch), engine=engine)
    ids = m.tokenize(TEXT)
    full = m.logits(ids)
    session = Session(m, len(ids))
    steps = [m.transformer.forward(ids[:7], session.cache).numpy()]
    steps += [m.transformer.forward([t], session.cache).numpy() for t in ids[7:]]
    assert _rel(np.concatenate(steps), full) < 1e-5, _rel(np.concatenate(steps), full)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_transformers(arch):
    """moecli's generate (prefill, then the cache) against transformers' greedy argmax over the full sequence."""
    import transformers as T

    path = tiny_hf(arch)
    m = moecli.load(path, engine="ggml")
    ids = m.tokenize(TEXT)
    got = list(m.generate(ids, max_tokens=10, stop_at_eog=False))
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


@pytest.mark.parametrize("key, value, tensor", [("kv_lora_rank", 128, r"blk\.0\.attn_kv_a_mqa\.weight"),
                                                ("moe_intermediate_size", 128, r"blk\.1\.ffn_gate_exps\.weight"),
                                                ("n_routed_experts", 32, r"blk\.1\.ffn_\w+_exps .*expected 32")])
def test_config_disagreeing_with_tensors_names_the_tensor(tmp_path, key, value, tensor):
    import json
    import shutil

    from moecli.errors import MoecliError

    src = tiny_hf("deepseek3")
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(MoecliError, match=tensor):
        moecli.load(tmp_path, engine="torch")


def test_multi_token_prediction_layer_is_skipped(tmp_path):
    """V3 checkpoints carry an MTP module as layer num_hidden_layers (61 of 61): loading ignores it, logits unchanged."""
    import shutil

    from safetensors.numpy import save_file

    src = tiny_hf("deepseek3")
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, tmp_path / f.name)
    n = moecli.load(src, engine="torch").config.n_layer
    mtp = {f"model.layers.{n}.{k}": np.ones(shape, np.float32) for k, shape in
           (("eh_proj.weight", (8, 16)), ("enorm.weight", (16,)), ("self_attn.kv_a_layernorm.weight", (5,)),
            ("mlp.experts.0.down_proj.weight", (3, 7)))}
    save_file(mtp, str(tmp_path / "zz-mtp.safetensors"))
    ids = moecli.load(src, engine="torch").tokenize(TEXT)
    assert np.array_equal(moecli.load(tmp_path, engine="torch").logits(ids),
                          moecli.load(src, engine="torch").logits(ids))
