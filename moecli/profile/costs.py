"""The cost model of one checkpoint on this host: its geometry from its own config, priced by this host's profile
(`moecli profile`), so the executor, `chat` and `bench` decide with measured costs instead of the defaults."""
from __future__ import annotations

from pathlib import Path

from moecli.errors import MoecliError
from moecli.policy.cost import CostModel, build_cost_model, load_profile
from moecli.policy.geometry import BITS_PER_WEIGHT, ModelGeometry


def expert_quant(ckpt) -> str:
    """The cost model's quant label of the first MoE layer's experts (gate and down types)."""
    from moecli.profile.microbench import quant_label

    c = ckpt.config
    l0 = next(l for l in range(c.n_layer) if f"blk.{l}.ffn_gate_exps" in ckpt.experts)
    return quant_label(ckpt.experts[f"blk.{l0}.ffn_gate_exps"].expert(0).type,
                       ckpt.experts[f"blk.{l0}.ffn_down_exps"].expert(0).type)


def geometry_from_checkpoint(ckpt, name: str, quant: str, facts) -> ModelGeometry | None:
    """A ModelGeometry for the cost model from the checkpoint's own config (None when its quant mix has no entry
    in the geometry table: then no cost model from a profile)."""
    if quant.upper() not in BITS_PER_WEIGHT:
        return None
    c = ckpt.config
    head = c.n_vocab * c.n_embd
    L = len(facts.moe_layers)
    shared = (1 if c.n_ff_shexp else 0) * 3 * c.n_embd * c.n_ff_shexp
    attn = max((facts.dense_params - head) // max(L, 1) - shared, 0)
    return ModelGeometry(name, L, c.n_embd, c.n_ff_exp, c.n_expert, c.n_expert_used,
                         n_shared=1 if c.n_ff_shexp else 0, shared_ffn=c.n_ff_shexp, attn_params=attn,
                         head_params=head, default_quant=quant.upper())


def host_costs(ckpt, model: str | Path, model_name: str | None = None,
               profile: str | Path | None = None) -> tuple[CostModel | None, str]:
    """(cost model, where it came from) for `ckpt` on this host: `profile` (a path or name) or the profile
    `moecli profile` wrote for this host and model; (None, why) without one."""
    from moecli.profile import plan as P, store

    found = store.resolve_profile(profile) if profile else store.find_profile(model_name or model)
    if found is None:
        return None, "no host profile for this model: the executor's default costs, refitted as it runs"
    label = store.model_key(model_name or model) or "model"
    quant = expert_quant(ckpt)
    facts = P.ModelFacts.from_checkpoint(ckpt, label, quant=quant)
    geom = geometry_from_checkpoint(ckpt, label, quant, facts)
    if geom is None:
        return None, f"host profile {found.name}: no cost model for {quant} experts (default costs, refitted)"
    try:
        costs = build_cost_model(load_profile(found), geom, quant)
    except (MoecliError, ZeroDivisionError) as e:
        return None, f"host profile {found.name} unusable ({e}): default costs, refitted"
    return costs, f"costs from host profile {found.name}"
