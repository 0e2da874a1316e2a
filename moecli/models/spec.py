"""Layer specs: the tensors an architecture's checkpoint holds (GGUF names, ggml shapes from the config, the layers
that have them, whether they may be absent), declared once per architecture as llama.cpp's llama-arch.cpp tables.

One spec is read by the loader's validation (`validate`), both engines (`layer_tensors`: a layer's tensors by
key, the name without `.weight`) and the synthetic-model writer (`plan`: names, numpy shapes, init kinds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from moecli.errors import MoecliError
from moecli.models.config import Checkpoint, ModelConfig


def _always(c, l) -> bool:
    return True


@dataclass(frozen=True)
class TensorSpec:
    name: str  # under `blk.N.` for a layer tensor: "attn_q.weight"
    ne: Callable[[ModelConfig], tuple]  # ggml shape
    init: str = "w"  # the synthetic writer's random init (moecli.synth._chunks)
    when: Callable[[ModelConfig, int], bool] = _always  # the layers (l; -1 for globals) that have it
    required: bool = True  # False: the file may omit it (biases, tied output, gates)

    @property
    def key(self) -> str:
        return self.name[:-len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def experts(self) -> bool:
        """A routed-expert stack: the loader keeps it as an ExpertStack (GGUF 3-D, safetensors per expert)."""
        return "_exps." in self.name


def _no_check(c) -> None:
    return None


@dataclass(frozen=True)
class Spec:
    layer: tuple
    globals: tuple = field(default_factory=tuple)
    check: Callable[[ModelConfig], None] = _no_check  # config invariants beyond shapes (raise MoecliError)


# ------------------------------------------------------------------------------------------------ blocks

def q_width(c):
    return c.n_head * c.head_dim


def kv_width(c):
    return c.n_head_kv * c.head_dim


def moe_layer(c, l) -> bool:
    return c.is_moe and l >= c.n_dense_layers and (l + 1) % c.moe_step == 0


def dense_layer(c, l) -> bool:
    return not moe_layer(c, l)


def _not_tied(c, l) -> bool:
    return not c.tie_embeddings


GLOBALS = (
    TensorSpec("token_embd.weight", lambda c: (c.n_embd, c.n_vocab), "embd"),
    TensorSpec("output_norm.weight", lambda c: (c.n_embd,), "norm"),
    TensorSpec("output.weight", lambda c: (c.n_embd, c.n_vocab), "out", when=_not_tied, required=False),
)


def norm(name: str, when=_always, width=lambda c: c.n_embd) -> TensorSpec:
    return TensorSpec(name, lambda c: (width(c),), "norm", when)


def attention(bias: Callable = lambda c, l: False, out_bias: Callable = lambda c, l: False) -> tuple:
    """attn_norm, q/k/v/o (+ optional biases), q/k RMSNorms per head (qk_norm "head") or over the projection
    ("full")."""
    def b(name, width, when):
        return TensorSpec(name, lambda c: (width(c),), "bias", when, required=False)
    return (
        norm("attn_norm.weight"),
        TensorSpec("attn_q.weight", lambda c: (c.n_embd, q_width(c))), b("attn_q.bias", q_width, bias),
        TensorSpec("attn_k.weight", lambda c: (c.n_embd, kv_width(c))), b("attn_k.bias", kv_width, bias),
        TensorSpec("attn_v.weight", lambda c: (c.n_embd, kv_width(c))), b("attn_v.bias", kv_width, bias),
        norm("attn_q_norm.weight", lambda c, l: c.qk_norm == "head", lambda c: c.head_dim),
        norm("attn_k_norm.weight", lambda c, l: c.qk_norm == "head", lambda c: c.head_dim),
        norm("attn_q_norm.weight", lambda c, l: c.qk_norm == "full", q_width),
        norm("attn_k_norm.weight", lambda c, l: c.qk_norm == "full", kv_width),
        TensorSpec("attn_output.weight", lambda c: (q_width(c), c.n_embd)),
        b("attn_output.bias", lambda c: c.n_embd, out_bias),
    )


def ffn(when=dense_layer, width=lambda c: c.n_ff) -> tuple:
    return (TensorSpec("ffn_gate.weight", lambda c: (c.n_embd, width(c)), when=when),
            TensorSpec("ffn_up.weight", lambda c: (c.n_embd, width(c)), when=when),
            TensorSpec("ffn_down.weight", lambda c: (width(c), c.n_embd), when=when))


def moe(gate_up_init: str = "w") -> tuple:
    """Router and the routed experts' stacks {in, out, E}."""
    return (TensorSpec("ffn_gate_inp.weight", lambda c: (c.n_embd, c.n_expert), "router", moe_layer),
            TensorSpec("ffn_gate_exps.weight", lambda c: (c.n_embd, c.n_ff_exp, c.n_expert), gate_up_init,
                       moe_layer),
            TensorSpec("ffn_up_exps.weight", lambda c: (c.n_embd, c.n_ff_exp, c.n_expert), gate_up_init, moe_layer),
            TensorSpec("ffn_down_exps.weight", lambda c: (c.n_ff_exp, c.n_embd, c.n_expert), "w", moe_layer))


def shared_expert() -> tuple:
    """The shared expert of width n_ff_shexp (+ Qwen2-MoE's sigmoid gate, {n_embd})."""
    def on(c, l):
        return moe_layer(c, l) and c.n_ff_shexp > 0
    return (TensorSpec("ffn_gate_inp_shexp.weight", lambda c: (c.n_embd,), "shgate",
                       lambda c, l: on(c, l) and c.shared_expert_gate),
            TensorSpec("ffn_gate_shexp.weight", lambda c: (c.n_embd, c.n_ff_shexp), when=on),
            TensorSpec("ffn_up_shexp.weight", lambda c: (c.n_embd, c.n_ff_shexp), when=on),
            TensorSpec("ffn_down_shexp.weight", lambda c: (c.n_ff_shexp, c.n_embd), when=on))


# ------------------------------------------------------------------------------------------------ readers

def layer_specs(spec: Spec, c: ModelConfig, l: int):
    return [t for t in spec.layer if t.when(c, l)]


def validate(ckpt: Checkpoint, spec: Spec) -> None:
    """Every tensor of the spec against the config (ggml order), naming the first that disagrees."""
    c = ckpt.config
    if c.n_head_kv < 1 or c.n_head % c.n_head_kv:
        raise MoecliError(f"{c.n_head} query heads do not divide into {c.n_head_kv} KV heads")
    spec.check(c)
    for t in spec.globals:
        if t.when(c, -1):
            ckpt.check_shape(t.name, *t.ne(c), optional=not t.required)
    for l in range(c.n_layer):
        b = f"blk.{l}."
        for t in layer_specs(spec, c, l):
            if t.experts and t.name.endswith(".weight"):
                _check_stack(ckpt, b + t.name, t.ne(c))
            elif t.experts:  # expert biases travel with their stack
                stack = ckpt.experts.get(b + t.key.rsplit(".", 1)[0])
                if stack is not None and stack.bias is not None and tuple(stack.bias.ne) != t.ne(c):
                    raise MoecliError(f"tensor {b}{t.name} has shape {list(stack.bias.ne)}, "
                                      f"expected {list(t.ne(c))} from the model config")
            else:
                ckpt.check_shape(b + t.name, *t.ne(c), optional=not t.required)


def _check_stack(ckpt: Checkpoint, name: str, ne: tuple) -> None:
    stack = ckpt.experts.get(name[:-len(".weight")])
    if stack is None:
        raise MoecliError(f"model file lacks tensor {name}")
    got = tuple(stack.stacked.ne) if stack.stacked is not None else (*stack.ne, stack.n)
    if got != tuple(ne):
        raise MoecliError(f"tensor {name} has shape {list(got)}, expected {list(ne)} from the model config")


def layer_tensors(ckpt: Checkpoint, spec: Spec, l: int) -> dict:
    """Layer l's non-expert tensors by key ("attn_q", "attn_q.bias", ...); optional ones only where present."""
    b, out = f"blk.{l}.", {}
    for t in layer_specs(spec, ckpt.config, l):
        if t.experts:
            continue
        w = ckpt.tensor(b + t.name) if t.required else ckpt.optional(b + t.name)
        if w is not None:
            out[t.key] = w
    return out


def plan(spec: Spec, c: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, init kind) of every tensor a synthetic file of `c` holds, globals around the layers
    (token_embd first, output_norm and output last, as llama.cpp's converter writes them)."""
    glob = [(t.name, tuple(reversed(t.ne(c))), "embd_tied" if t.init == "embd" and c.tie_embeddings else t.init)
            for t in spec.globals if t.when(c, -1)]
    out = glob[:1]
    for l in range(c.n_layer + c.n_nextn_layers):
        out += [(f"blk.{l}.{t.name}", tuple(reversed(t.ne(c))), t.init) for t in layer_specs(spec, c, l)]
    return out + glob[1:]
