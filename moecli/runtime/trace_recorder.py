"""`--record-trace`: the routing of a real run (ids, weights, full router scores, the executor's predictions, its
clock readings and cost model) in the simulator's trace format, so `bench --simulate` can replay it on hosts we don't have."""
from __future__ import annotations

from moecli.sim.traces import LayerRouting, Pass, Sequence, Trace, write_trace


class TraceRecorder:
    def __init__(self, model_name: str, n_experts: int, top_k: int, layers: list[int],
                 executor: dict | None = None, known_early=()):
        self.trace = Trace(model_name, n_experts, top_k, list(layers), [Sequence("0", [])], full_scores=True,
                           executor=executor, known_early=sorted(known_early))
        self.first_layer = layers[0]

    def __call__(self, layer, ids, weights, scores, predictions: dict[int, list[list[int]]],
                 clock: dict[str, float] | None = None, costs: dict | None = None) -> None:
        """One layer call: its routing, the predictions made for it earlier, and (for replays) the executor's clock
        readings at its decisions and, on a pass's first layer, the cost model that pass decides with."""
        passes = self.trace.sequences[0].passes
        if layer == self.first_layer:  # a new forward pass begins
            passes.append(Pass("prefill" if ids.shape[0] > 1 else "decode", {}, costs))
        r = LayerRouting(ids.tolist(), weights.float().tolist(),
                         scores.float().tolist() if scores is not None else None, dict(predictions), clock)
        passes[-1].layers[layer] = r
        self.trace.has_predictions |= bool(predictions)
        self.trace.full_scores &= scores is not None

    def write(self, path) -> None:
        write_trace(self.trace, path)
