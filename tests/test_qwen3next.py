"""qwen3next and qwen35moe (hybrid Gated DeltaNet + gated attention MoE), what is particular to them (the checks
every family passes are in tests/test_families.py): the recurrent state carried across calls and batched decode,
no rewinding, the layer kinds, the presets, sessions reusing prefixes at state checkpoints.

Fixtures (tests/conftest.py): qwen3next 3 layers (DeltaNet, attention, DeltaNet), fused ssm_in/ssm_ba; qwen35moe
4 layers (3 DeltaNet, attention), separate projections, IMRoPE sections; both 2 k heads / 4 v heads.
"""
import numpy as np
import pytest
from conftest import tiny_gguf
from llama_oracle import rel_diff

import moecli

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits) of the torch engine (measured ~8e-6)


def test_state_carried_equals_one_pass():
    """Prefill in pieces and decode steps give the logits of one pass; two sequences decoded in one batch (each
    on its own state) give their own."""
    m = moecli.load(tiny_gguf("qwen35moe", "F32"), engine="ggml", flash_attn=False)
    tr = m.transformer
    ids = m.tokenize(TEXT)
    full = tr.forward(ids, tr.new_cache(len(ids))).numpy()
    cache = tr.new_cache(len(ids))
    parts = [tr.forward(ids[:20], cache).numpy(), tr.forward(ids[20:30], cache).numpy()]
    parts += [tr.forward([t], cache).numpy() for t in ids[30:]]
    assert rel_diff(np.concatenate(parts), full) < 1e-5
    a, b = tr.new_cache(len(ids)), tr.new_cache(len(ids))
    tr.forward(ids[:20], a)
    tr.forward(ids[5:30], b)
    for i in range(8):
        both = tr.forward_batch([([ids[20 + i]], a), ([ids[30 + i]], b)]).numpy()
        assert rel_diff(both[0], full[20 + i]) < 1e-5
    one = tr.forward(ids[5:38], tr.new_cache(len(ids)), all_logits=False).numpy()
    assert rel_diff(both[1], one[0]) < 1e-5


def test_recurrent_state_cannot_rewind():
    from moecli.errors import MoecliError

    m = moecli.load(tiny_gguf("qwen3next", "F32"), engine="ggml")
    tr = m.transformer
    ids = m.tokenize(TEXT)
    cache = tr.new_cache(64)
    tr.forward(ids[:10], cache)
    cache.pos = 5  # what a prefix reuse would do: the state holds all 10 tokens
    with pytest.raises(MoecliError, match="recurrent state is at position 10"):
        tr.forward(ids[5:8], cache)


def test_layer_kinds_in_config():
    m = moecli.load(tiny_gguf("qwen35moe", "F32"), engine="ggml")
    c = m.config
    assert (c.recurrent_layers, c.rope_sections, c.rope_dim, c.ssm_groups, c.ssm_heads, c.ssm_state) == \
        ((0, 1, 2), (6, 5, 5, 0), 32, 2, 4, 64)
    cache = m.transformer.new_cache(256)
    assert cache.k.shape[0] == 1 and cache.conv.shape == (3, 3 * 512) and cache.ssm.shape == (3, 64 * 64 * 4)


def test_presets_and_limits():
    """The real geometries' synthetic configs, the KV bytes per token of attention layers only, `moecli show`."""
    from moecli import limits
    from moecli.cli.pull import layer_kinds
    from moecli.policy.geometry import GEOMETRIES
    from moecli.synth import config, geometry, geometry_arch

    c = config(geometry_arch("qwen3.6-35b-a3b"), geometry("qwen3.6-35b-a3b", n_layer=40))
    assert (c.arch, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.rope_dim, c.rope_sections) == \
        ("qwen35moe", 2048, 16, 2, 256, 64, (11, 11, 10, 0))
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.n_ff_shexp, c.ssm_groups, c.ssm_heads, c.ssm_state) == \
        (256, 8, 512, 512, 16, 32, 128)
    assert len(c.recurrent_layers) == 30 and 3 not in c.recurrent_layers and c.n_ctx_train == 262144
    assert limits.kv_bytes_per_token(c, 2) == 10 * 2 * 256 * 2 * 2 + 2 * 64 * 4  # 10 attention layers, f16
    assert layer_kinds(c) == "40 MoE (30 Gated DeltaNet, 10 attention)"
    g = GEOMETRIES["qwen3-next-80b-a3b"]
    assert (g.n_layers, g.n_experts, g.top_k, g.expert_ffn, g.n_shared, g.shared_ffn) == (48, 512, 10, 512, 1, 512)
    assert config(geometry_arch("qwen3.5-122b-a10b"), geometry("qwen3.5-122b-a10b", n_layer=4)).ssm_heads == 64


@pytest.mark.parametrize("engine", ["ggml", "torch"])
def test_session_reuses_prefixes_at_state_checkpoints(engine):
    """Chat turns on a recurrent model: the next turn goes on from the state kept at the end of the last one (or
    after its prompt, when the reply in the new prompt differs), else recomputes from the start; the logits are
    always those of a fresh pass."""
    from moecli.api import Session

    m = moecli.load(tiny_gguf("qwen3next", "F32"), engine=engine, flash_attn=False)
    ids = m.tokenize(TEXT)
    s = Session(m, 256)
    turn1 = ids[:20]
    reply = list(m.generate(turn1, max_tokens=4, stop_at_eog=False, session=s))
    fresh = lambda toks: np.asarray(m.logits(toks))[-1]  # noqa: E731
    turn2 = turn1 + reply + ids[20:30]  # extends everything cached: from the state at the end of turn 1 (the
    feed = s.reuse(turn2)  # last reply token was sampled, never fed)
    assert feed == reply[-1:] + ids[20:30] and rel_diff(m.step(s, feed).numpy(), fresh(turn2)) < 1e-5
    turn3 = turn1 + ids[40:50]  # another reply to turn 1's prompt: from the state kept after that prompt
    feed = s.reuse(turn3)
    assert feed == ids[40:50] and rel_diff(m.step(s, feed).numpy(), fresh(turn3)) < 1e-5
    turn4 = ids[:10] + ids[30:40]  # shares 10 tokens, but no state was kept there: from the start
    assert s.reuse(turn4) == turn4 and s.cache.pos == 0
    assert rel_diff(m.step(s, turn4).numpy(), fresh(turn4)) < 1e-5
