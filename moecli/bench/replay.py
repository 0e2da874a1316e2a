"""`moecli bench --replay TRACE`: the simulator against the executor that recorded TRACE (`chat --record-trace`).

Two runs over the trace's passes, both through the decision core:
  replay     the executor's own clock readings and cost models: its decisions, so the copies and CPU share
             must be the executor's;
  predicted  a simulated clock with the executor's final (refitted) decode cost model: what `bench --simulate`
             would predict for this executor; its TBT against the executor's measured pass times is the simulator's
             error. The prompt is predicted with the prompt cost model the executor last decided a prompt with (its
             prompts and decode are fitted apart; a one-prompt trace: the prior it started from).
Measured pass time = from one pass's first MoE layer to the next's (the last pass has no end and is left out).
"""
from __future__ import annotations

from pathlib import Path

from moecli.errors import MoecliError
from moecli.policy.cost import CostModel
from moecli.policy.placement import get_placement
from moecli.sim.simulate import Simulator
from moecli.sim.traces import read_trace


def compare(path: str | Path) -> dict:
    trace = read_trace(path)
    passes = trace.sequences[0].passes if trace.sequences else []
    first = trace.layers[0] if trace.layers else None
    if not trace.executor or len(passes) < 3 or any(ps.layers[first].clock is None for ps in passes):
        raise MoecliError(f"{path}: not an executor trace with clocks (record one with `moecli chat MODEL "
                          "--placement P --record-trace FILE`, at least 3 forward passes)")
    p, slots = get_placement(trace.executor["placement"]), int(trace.executor["slots"])
    costs = [ps.costs for ps in passes if ps.costs]
    final = CostModel.from_dict(costs[-1])
    starts = [ps.layers[first].clock["now"] for ps in passes]
    measured = [b - a for a, b in zip(starts, starts[1:])]
    out = {"trace": str(path), "placement": p.name, "slots": slots, "passes": len(passes),
           "costs_ms": {k: v for k, v in final.as_dict().items() if k != "cpu_pieces"}}

    def simulate(costs: dict, recorded: bool, over: list):
        return Simulator(p, CostModel.from_dict(costs), trace.layers, trace.n_experts, slots, {}, initial={},
                         recorded_clock=recorded, whole_layer_offload=False,
                         sync_copies=trace.executor.get("device", "cpu") != "cuda", known=trace.known_early).run(over)

    runs = {"replay": simulate(costs[0], True, passes), "predicted": simulate(costs[-1], False, passes)}
    pred = runs["predicted"].pass_ms[: len(measured)]
    prompt_costs = [ps.costs for ps in passes if ps.kind == "prefill" and ps.costs]
    if passes[0].kind == "prefill" and prompt_costs and pred:
        pred[0] = simulate(prompt_costs[-1], False, passes[:1]).pass_ms[0]
    decode = [i for i, ps in enumerate(passes[: len(measured)]) if ps.kind == "decode"]
    tbt_m = sum(measured[i] for i in decode) / len(decode) if decode else 0.0
    tbt_p = sum(pred[i] for i in decode) / len(decode) if decode else 0.0
    out.update(decode_passes=len(decode), measured_tbt_ms=tbt_m, predicted_tbt_ms=tbt_p,
               tbt_error=(tbt_p / tbt_m - 1.0) if tbt_m > 0 else None,
               measured_prefill_ms=measured[0] if passes[0].kind == "prefill" else None,
               predicted_prefill_ms=pred[0] if passes[0].kind == "prefill" else None,
               replay={"copies": runs["replay"].copies, "hit_rate": runs["replay"].hit_rate,
                       "cpu_share": runs["replay"].cpu_share},
               predicted={"copies": runs["predicted"].copies, "hit_rate": runs["predicted"].hit_rate,
                          "cpu_share": runs["predicted"].cpu_share})
    return out


def render(out: dict) -> str:
    e = out["tbt_error"]
    lines = [f"{out['trace']}: {out['placement']}, {out['slots']} slots, {out['passes']} passes "
             f"({out['decode_passes']} decode timed)",
             "| run | TBT ms | prefill ms | hit % | CPU % | copies |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| executor (measured) | {out['measured_tbt_ms']:.3f} | {_ms(out['measured_prefill_ms'])} | - | - | - |"]
    for name in ("replay", "predicted"):
        r = out[name]
        tbt = f"{out['predicted_tbt_ms']:.3f}" if name == "predicted" else "-"
        pre = _ms(out["predicted_prefill_ms"]) if name == "predicted" else "-"
        lines.append(f"| simulator ({name}) | {tbt} | {pre} | {100 * r['hit_rate']:.1f} | {100 * r['cpu_share']:.0f}"
                     f" | {r['copies']} |")
    lines.append(f"simulated TBT / measured: {e + 1:.3f} ({100 * e:+.1f} %)" if e is not None else
                 "no decode pass timed")
    return "\n".join(lines) + "\n"


def _ms(v) -> str:
    return f"{v:.3f}" if v is not None else "-"
