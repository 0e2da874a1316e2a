"""The CPU engine's one-graph forward (moecli.runtime.ggml_forward) against llama.cpp and against itself: decoding
across the 256-key buckets of the KV cache, sessions that continue a cache, the last-token-only path of prompts, and
the routing it reports from inside the graph."""
import numpy as np
import pytest
from conftest import tiny_gguf
from llama_oracle import greedy_tokens, run_llama

import moecli
from moecli.runtime.ggml_forward import GgmlKVCache

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"


def _fused(m) -> bool:
    return m.transformer.fused_forward is not None


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "llama-dense"])
def test_q8_0_logits_bit_exact(arch):
    """Same graph, same shapes, same kernels as llama.cpp (which repacks none of Q8_0 on x86): identical logits."""
    path = tiny_gguf(arch, "Q8_0")
    m = moecli.load(path, engine="ggml", flash_attn=False)
    assert _fused(m)
    ids = m.tokenize(TEXT)
    ref, _ = run_llama(path, ids)
    assert np.array_equal(m.logits(ids), ref)


@pytest.mark.parametrize("arch", ["qwen2moe", "deepseek2-lite", "deepseek3"])
def test_split_mode_prompts_bit_exact(arch):
    """Q8_0 prompts big enough for the per-expert loop run one graph per layer with the experts in between (split
    mode): still llama.cpp's logits, with deepseek2's leading dense layer (its K/V stores ride in the first MoE
    layer's graph) and shared experts."""
    path = tiny_gguf(arch, "Q8_0")
    m = moecli.load(path, engine="ggml", flash_attn=False)
    ids = (m.tokenize(TEXT) * 4)[:100]
    assert m.transformer.fused_forward._split(len(ids))
    ref, _ = run_llama(path, ids)
    assert np.array_equal(m.logits(ids), ref)


def test_prompts_share_one_allocation_whatever_their_size():
    """Prompt graphs share the forward's allocator (its buffer grows, then stays) and the expert loop its buffers:
    prompts growing and shrinking, in split mode or not, give what a fresh model gives."""
    path = tiny_gguf("qwen3moe", "Q8_0")
    m = moecli.load(path, engine="ggml")
    ids = (m.tokenize(TEXT) * 4)[:120]
    sizes = (10, 120, 30, 90)
    got = [m.logits(ids[:n]) for n in sizes]
    assert [m.transformer.fused_forward._split(n) for n in sizes] == [False, True, False, True]
    for n, g in zip(sizes, got):
        assert np.array_equal(g, moecli.load(path, engine="ggml").logits(ids[:n])), n


def test_decode_across_kv_buckets_equals_llama_cpp():
    """A 250-token prompt then 14 greedy steps: the attended key count goes 256 -> 512 as in llama.cpp."""
    path = tiny_gguf("qwen3moe", "Q8_0")
    m = moecli.load(path, engine="ggml")
    ids = (m.tokenize(TEXT) * 12)[:250]
    got = list(m.generate(ids, max_tokens=14, stop_at_eog=False))
    assert got == greedy_tokens(path, ids, 14)


def test_cache_layout_and_session_reuse():
    m = moecli.load(tiny_gguf("mixtral", "F32"), engine="ggml")
    cache = m.transformer.new_cache(300)
    assert isinstance(cache, GgmlKVCache) and cache.capacity == 512 and cache.n_ctx == 300
    ids = m.tokenize(TEXT)
    full = m.logits(ids)
    cache = m.transformer.new_cache(len(ids))
    parts = [m.transformer.forward(ids[:7], cache).numpy(), m.transformer.forward(ids[7:10], cache).numpy()]
    parts += [m.transformer.forward([t], cache).numpy() for t in ids[10:]]
    assert np.abs(np.concatenate(parts) - full).max() < 1e-4
    # the last-token-only prompt (llama.cpp's out_ids) gives that token's logits
    cache.pos = 0
    last = m.transformer.forward(ids, cache, all_logits=False).numpy()
    assert last.shape == (1, full.shape[1]) and np.abs(last[0] - full[-1]).max() < 1e-5


@pytest.mark.parametrize("split", [False, True])
def test_routing_reported_from_the_graph_equals_the_reference(split):
    """Also in split mode (one graph per layer, the experts outside), whose layers share one allocation: each layer's
    routing is reported before the next layer overwrites it."""
    ids = None
    seen = {}
    for engine in ("ggml", "torch"):
        m = moecli.load(tiny_gguf("qwen2moe", "F32"), engine=engine)
        if engine == "ggml":
            m.transformer.fused_forward._split = lambda n: split
        ids = ids or m.tokenize(TEXT)
        got = seen[engine] = {}
        m.transformer.on_router = lambda l, probs, sel, w: got.setdefault(l, (probs, sel, w))
        m.logits(ids)
    for l in seen["torch"]:
        (pg, sg, wg), (pt, st, wt) = seen["ggml"][l], seen["torch"][l]
        assert sg.dtype == st.dtype and sg.shape == st.shape == (len(ids), 2)
        assert (np.sort(sg.numpy(), 1) == np.sort(st.numpy(), 1)).all()
        assert np.abs(pg.numpy() - pt.numpy()).max() < 1e-5 and np.abs(wg.numpy() - wt.numpy()).max() < 1e-5


def test_long_prompts_go_in_micro_batches(monkeypatch):
    """Prompts longer than UBATCH run in chunks (the attention scores of one batch are n x n_kv per head); the
    logits do not depend on the chunking."""
    import moecli.runtime.ggml_forward as F
    from moecli.errors import MoecliError

    m = moecli.load(tiny_gguf("qwen3moe", "Q8_0"), engine="ggml")
    ids = (m.tokenize(TEXT) * 20)[:700]
    whole = m.logits(ids)
    monkeypatch.setattr(F, "UBATCH", 96)
    assert np.array_equal(m.logits(ids), whole)
    cache = m.transformer.new_cache(len(ids))
    assert np.array_equal(m.transformer.forward(ids, cache, all_logits=False).numpy()[0], whole[-1])
    with pytest.raises(MoecliError, match="out of range"):
        m.transformer.forward([m.config.n_vocab], m.transformer.new_cache(4))


def test_deepseek2_on_the_graph_bit_exact(tmp_path):
    """deepseek2 runs as llama.cpp's graph, both MLA forms: the decompressed cache (V2-Lite style: softmax, YaRN;
    and a V3 routing on it: sigmoid + selection bias, 4 groups of 4 with 2 kept, top-4 renormalised x2.5) and the
    absorbed latent attention of split k_b/v_b files (the "deepseek3" fixture, also in Q8_0)."""
    import dataclasses

    from conftest import TINY

    from moecli.synth import write_gguf

    lite = TINY["deepseek2-lite"][1]
    v3_routing = dataclasses.replace(lite, n_expert=16, n_expert_used=4, gating="sigmoid", expert_bias=True,
                                     n_group=4, topk_group=2, weights_norm=True, weights_scale=2.5)
    for name, dims in (("lite", lite), ("v3-routing", v3_routing)):
        path = write_gguf(tmp_path / f"{name}.gguf", "deepseek2", dims, 0, "F32")
        m = moecli.load(path, engine="ggml", flash_attn=False)
        assert m.transformer.fused_forward is not None, name
        ids = m.tokenize(TEXT)
        ref, _ = run_llama(path, ids)
        assert np.array_equal(m.logits(ids), ref), name
    for arch, ftype in (("deepseek3", "F32"), ("deepseek3", "Q8_0")):
        path = tiny_gguf(arch, ftype)
        m = moecli.load(path, engine="ggml")  # the latent form attends without flash attention either way
        assert m.transformer.fused_forward is not None and m.config.mla_split
        ids = m.tokenize(TEXT)
        ref, _ = run_llama(path, ids)
        assert np.array_equal(m.logits(ids), ref), (arch, ftype)
