"""The shared decoder's one-token step on the device kernels: a dozen launches per layer where torch dispatches ~100.

attention block: RMSNorm -> q, k, v -> (q/k norm, RoPE, KV store: one kernel) -> decode attention -> o ->
residual + FFN RMSNorm (one kernel); router: its matmul -> scores, top-k, renormalisation (one kernel). Every
result lands in a buffer allocated once (the same addresses at every step and layer: what a CUDA graph replays
over); the FFN input, routing ids (as float32), weights and scores land directly in the executor's packed
device->host buffer when the experts offer one (`experts.staging(1)`), so its one read per layer copies them as
they lie. Active where the dense weights go through the kernels (CUDA; the CPU device with
MOECLI_CPU_DENSE_KERNELS=1 under Triton's interpreter), for the shared decoder (sliding windows too) and gpt-oss
(sinks); prompts (n > 1) and DeepSeek's MLA take the torch path.
"""
from __future__ import annotations

import torch

from moecli.kernels import decode_ops as K
from moecli.kernels import device_ops
from moecli.runtime.step_graphs import StepGraphs


class _Buffers:
    def __init__(self, c, device):
        def f32(n, dtype=torch.float32):
            return torch.zeros((1, n), dtype=dtype, device=device)

        H, Hkv, D = c.n_head, c.n_head_kv, c.head_dim
        self.h, self.o, self.x, self.hidden = f32(c.n_embd), f32(c.n_embd), f32(c.n_embd), f32(c.n_embd)
        self.q, self.qr, self.att = f32(H * D), f32(H * D), f32(H * D)
        self.k, self.v = f32(Hkv * D), f32(Hkv * D)
        if c.n_expert:
            self.logits, self.probs = f32(c.n_expert), f32(c.n_expert)
            self.ids, self.weights = f32(c.n_expert_used, torch.int32), f32(c.n_expert_used)


class DecodeBlock:
    def __init__(self, transformer, attention: bool, routing: bool):
        self.tr, self.c = transformer, transformer.config
        self.attention, self.routing = attention, routing
        self.buf = _Buffers(self.c, transformer.device)
        self.graphs = StepGraphs(transformer.device)  # CUDA: each layer's segment one graph replay
        self.x_in = torch.zeros((1, self.c.n_embd), device=transformer.device)  # the graphs' static input
        self.pos = torch.zeros(1, dtype=torch.long, device=transformer.device)
        self._pos_src = None  # the forward pass's position tensor last copied into self.pos (held: no id reuse)
        self._ffn_bufs: dict[int, tuple] = {}  # FFN width -> (gate/act, up, down out) buffers
        self.moe_out = torch.zeros((1, self.c.n_embd), device=transformer.device)

    @classmethod
    def build(cls, tr) -> "DecodeBlock | None":
        """The decode block of transformer `tr`, or None where the kernels do not run its dense weights."""
        from moecli.models.gpt_oss import GptOssTransformer
        from moecli.models.transformer import Transformer

        if not device_ops.use_triton(tr.device.type):
            return None
        c, L = tr.config, tr.layers

        # the attentions decode_attn computes: the shared one (+ sliding windows), gpt-oss's (sinks, windows)
        attention = (type(tr).attention in (Transformer.attention, GptOssTransformer.attention) and
                     c.qk_norm in (None, "head", "full") and
                     type(tr).attention_block is
                     Transformer.attention_block and all(cls.on_kernels((l.q, l.k, l.v, l.o)) for l in L))
        routers = [l.router for l in L if getattr(l, "router", None) is not None]
        routing = bool(routers) and K.routable(c) and cls.on_kernels(routers) and type(tr).moe is Transformer.moe
        return cls(tr, attention, routing) if attention or routing else None

    def attends(self, l: int) -> bool:
        return self.attention

    def _staged(self):
        staging = getattr(self.tr.experts, "staging", None)
        return staging(1) if staging is not None else None

    def attention_block(self, l: int, layer, x: torch.Tensor, pos: torch.Tensor, cache):
        """Transformer.attention_block for one token at device position `pos`: (residual stream, FFN input), one
        segment with the layer's routing when the router reads the FFN input (the result left in tr._early)."""
        st = self._staged()
        hidden = st.hidden if st is not None else self.buf.hidden
        routes = self.routing and layer.router is not None and self.c.router_input != "layer"
        if self.graphs.active:  # the graph reads its input and position from fixed addresses
            if pos is not self._pos_src:
                self.pos.copy_(pos)
                self._pos_src = pos
            self.x_in.copy_(x)
            x, pos = self.x_in, self.pos

        def segment():
            self._attention(l, layer, x, pos, cache, hidden)
            return self.route(layer, hidden) if routes else None

        # the layer offsets baked into a graph follow the cache's shape: a new cache at an old address recaptures
        tag = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), cache.k.dtype, hidden.data_ptr())
        r = self.graphs.run(("attn", l), segment, tag=tag, check=(self.buf.x, hidden))
        if routes:
            self.tr._early = r
        return self.buf.x, hidden

    def _attention(self, l: int, layer, x, pos, cache, hidden) -> None:
        c, B, eps = self.c, self.buf, self.c.rms_eps
        K.add_rms_norm(x, layer.attn_norm, eps, out_h=B.h)
        for lin, out in ((layer.q, B.q), (layer.k, B.k), (layer.v, B.v)):
            device_ops.linear(B.h, lin.qweight, lin.bias, out=out)
        head = c.qk_norm == "head"
        if c.qk_norm == "full":  # OLMoE: over the whole projection, before the heads are rotated
            K.add_rms_norm(B.q, layer.q_norm, eps, out_h=B.q)
            K.add_rms_norm(B.k, layer.k_norm, eps, out_h=B.k)
        K.qk_rope_store(B.q, B.k, B.v, pos, self.tr.rope, cache, l, B.qr, layer.q_norm if head else None,
                        layer.k_norm if head else None, eps, l not in c.nope_layers)
        window, sinks = (c.sliding_window if l in c.swa_layers else 0), getattr(layer, "sinks", None)
        scale = self.tr.kq_scale if window or sinks is not None else None  # as the torch paths scale
        K.decode_attn(B.qr, cache, l, pos, B.att, scale, window, sinks)
        device_ops.linear(B.att, layer.o.qweight, layer.o.bias, out=B.o)
        K.add_rms_norm(x, layer.ffn_norm, eps, out_h=hidden, res=B.o, out_x=B.x)

    @staticmethod
    def on_kernels(lins) -> bool:
        """Whether these TorchLinears hold their weights for the kernels (quantized bytes on the device)."""
        return all(getattr(lin, "qweight", None) is not None for lin in lins)

    def swiglu(self, lins, h: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(h)) * up(h)) for one token (a dense FFN, a shared expert): 4 launches into buffers of
        this width (the result valid until the next FFN of that width)."""
        gate, up, down = lins
        ff = gate.qweight.shape[0]
        bufs = self._ffn_bufs.get(ff)
        if bufs is None:
            dev = h.device
            bufs = self._ffn_bufs[ff] = (torch.zeros((1, ff), device=dev), torch.zeros((1, ff), device=dev),
                                         torch.zeros((1, self.c.n_embd), device=dev))
        g, u, y = bufs
        device_ops.linear(h, gate.qweight, gate.bias, out=g)
        device_ops.linear(h, up.qweight, up.bias, out=u)
        K.glu(g, u, g)
        device_ops.linear(g, down.qweight, down.bias, out=y)
        return y

    def combines(self, routed: torch.Tensor, shared_lins) -> bool:
        return routed.dtype == torch.float32 and routed.is_contiguous() and self.on_kernels(shared_lins)

    def shared_add(self, routed, s, h, gate) -> torch.Tensor:
        """routed + s (gated by sigmoid(h . gate)), one launch."""
        K.shared_add(routed, s, h, gate, self.moe_out)
        return self.moe_out

    def route(self, layer, inp: torch.Tensor):
        """models.layers.route(router(inp)) for one token: (scores, ids int32, weights), the staged ones when the
        experts offer a packed buffer."""
        B, st = self.buf, self._staged()
        device_ops.linear(inp, layer.router.qweight, layer.router.bias, out=B.logits)
        probs, weights, ids_f = (st.scores, st.weights, st.ids) if st is not None else (B.probs, B.weights, None)
        K.route(self.c, B.logits, layer.exp_bias, B.ids, weights, probs, ids_f)
        return probs, B.ids, weights
