"""The dense decode kernels (moecli.kernels.decode_triton, through decode_ops' custom ops) against their torch
references, under Triton's interpreter on tiny ragged shapes: a width that is not a power of two, partial rotary,
NEOX and NORM layouts, head norm or none, F32 and F16 caches, contexts shorter and longer than one key block,
softmax / sigmoid (+ selection bias) / softmax-over-top-k routing with renormalisation and scale."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from moecli.kernels import decode_ops as K  # noqa: E402
from moecli.kernels import device_ops as D  # noqa: E402
from moecli.models.layers import KVCache  # noqa: E402
from moecli.models.rope import Rope  # noqa: E402

if not D.use_triton("cpu"):
    pytest.skip("Triton's interpreter is not enabled (TRITON_INTERPRET=1)", allow_module_level=True)

G = torch.Generator().manual_seed(0)


def rnd(*shape, scale=1.0):
    return scale * torch.randn(*shape, generator=G)


@pytest.mark.parametrize("res", [False, True])
def test_rms_norm(res):
    x, r, w = rnd(2, 200), rnd(2, 200), rnd(200)
    out_h, out_x = torch.empty(2, 200), torch.empty(2, 200)
    K.add_rms_norm(x, w, 1e-6, out_h, r if res else None, out_x if res else None)
    want_x, want_h = K.add_rms_norm_ref(x, w, 1e-6, r if res else None)
    torch.testing.assert_close(out_h, want_h, rtol=2e-6, atol=1e-6)
    if res:
        assert torch.equal(out_x, want_x)


@pytest.mark.parametrize("neox,rot,norm,dtype", [(True, 24, True, torch.float32), (False, 24, False, torch.float32),
                                                 (True, 16, False, torch.float16), (False, 16, True, torch.float16)])
def test_qk_rope_store(neox, rot, norm, dtype):
    H, Hkv, Dh, pos = 4, 2, 24, 5
    rope = Rope(rot, 10000.0, neox, 16, "cpu")
    q, k, v = rnd(H * Dh), rnd(Hkv * Dh), rnd(Hkv * Dh)
    qn, kn = (rnd(Dh), rnd(Dh)) if norm else (None, None)
    p = torch.tensor([pos])
    got, want = KVCache(2, 16, Hkv, Dh, "cpu", dtype), KVCache(2, 16, Hkv, Dh, "cpu", dtype)
    q_out = torch.empty(H * Dh)
    K.qk_rope_store(q, k, v, p, rope, got, 1, q_out, qn, kn, 1e-6)
    q_ref = K.qk_rope_store_ref(q, k, v, p, rope, want, 1, qn, kn, 1e-6)
    torch.testing.assert_close(q_out.view(1, H, Dh), q_ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got.k, want.k, rtol=2e-6, atol=1e-6)
    assert torch.equal(got.v, want.v)
    assert got.k[0].abs().sum() == 0 and got.k[1, pos].abs().sum() > 0  # only layer 1, position 5


def test_nope_layer_stores_unrotated():
    H, Hkv, Dh = 2, 1, 16
    rope = Rope(Dh, 10000.0, True, 8, "cpu")
    q, k, v = rnd(H * Dh), rnd(Hkv * Dh), rnd(Hkv * Dh)
    cache, q_out = KVCache(1, 8, Hkv, Dh, "cpu"), torch.empty(H * Dh)
    K.qk_rope_store(q, k, v, torch.tensor([3]), rope, cache, 0, q_out, apply_rope=False)
    assert torch.equal(q_out, q) and torch.equal(cache.k[0, 3].reshape(-1), k)


@pytest.mark.parametrize("pos", [0, 6, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention(pos, dtype):
    H, Hkv, Dh = 6, 2, 24
    cache = KVCache(2, 80, Hkv, Dh, "cpu", dtype)
    cache.k.copy_(rnd(*cache.k.shape))
    cache.v.copy_(rnd(*cache.v.shape))
    q, out = rnd(H * Dh), torch.empty(H * Dh)
    K.decode_attn(q, cache, 1, torch.tensor([pos]), out)
    want = K.decode_attn_ref(q, cache, 1, torch.tensor([pos])).float()
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.view(1, -1), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("pos,window,sinks", [(70, 8, True), (70, 40, False), (3, 8, True), (50, 0, True)])
def test_decode_attention_window_and_sinks(pos, window, sinks):
    """gpt-oss (sinks, windows) and SmallThinker (windows) as their torch paths compute them (attend_sinks)."""
    H, Hkv, Dh = 4, 2, 16
    cache = KVCache(1, 80, Hkv, Dh, "cpu")
    cache.k.copy_(rnd(*cache.k.shape))
    cache.v.copy_(rnd(*cache.v.shape))
    q, out, s = rnd(H * Dh), torch.empty(H * Dh), (rnd(H) if sinks else None)
    p = torch.tensor([pos])
    K.decode_attn(q, cache, 0, p, out, 0.3, window, s)
    want = K.decode_attn_ref(q, cache, 0, p, 0.3, window, s)
    torch.testing.assert_close(out.view(1, -1), want, rtol=2e-6, atol=2e-6)
    if window:  # keys outside the window do not count
        cache.k[0, :max(0, pos - window + 1)] = 1e3
        K.decode_attn(q, cache, 0, p, out, 0.3, window, s)
        torch.testing.assert_close(out.view(1, -1), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("gating,bias,norm,scale", [("softmax", False, True, 0.0), ("softmax", False, False, 0.0),
                                                    ("sigmoid", True, True, 2.5),
                                                    ("softmax_weight", False, False, 1.0)])
def test_route(gating, bias, norm, scale):
    from moecli.models.layers import route

    E, k, n = 20, 3, 2
    c = SimpleNamespace(n_expert=E, n_expert_used=k, gating=gating, n_group=0, norm_topk=norm, routed_scale=scale,
                        select_logits=False)
    logits, b = rnd(n, E), (rnd(E) if bias else None)
    ids, ids_f, w, probs = torch.empty(n, k, dtype=torch.int32), torch.empty(n, k), torch.empty(n, k), torch.empty(n, E)
    K.route(c, logits, b, ids, w, probs, ids_f)
    want_p, want_ids, want_w = route(c, logits, b)
    assert torch.equal(ids.long(), want_ids) and torch.equal(ids_f, want_ids.float())
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(probs, want_p, rtol=2e-6, atol=1e-7)


def test_glu_and_shared_add():
    g, u = rnd(1, 1500), rnd(1, 1500)  # more than one block of 1024
    out = torch.empty(1, 1500)
    K.glu(g, u, out)
    torch.testing.assert_close(out, K.glu_ref(g, u), rtol=2e-6, atol=1e-7)
    routed, s, h, gate = rnd(1, 200), rnd(1, 200), rnd(1, 200), rnd(200, scale=0.1)
    for gt in (gate, None):
        out = torch.empty(1, 200)
        K.shared_add(routed, s, h, gt, out)
        torch.testing.assert_close(out, K.shared_add_ref(routed, s, h, gt), rtol=2e-6, atol=1e-6)
