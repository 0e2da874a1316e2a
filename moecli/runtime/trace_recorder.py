"""`--record-trace`: the routing of a real run (ids, weights, full router scores, the executor's predictions) in
the simulator's trace format, so `bench --simulate` can replay it on hosts we don't have."""
from __future__ import annotations

from moecli.sim.traces import LayerRouting, Pass, Sequence, Trace, write_trace


class TraceRecorder:
    def __init__(self, model_name: str, n_experts: int, top_k: int, layers: list[int]):
        self.trace = Trace(model_name, n_experts, top_k, list(layers), [Sequence("0", [])], full_scores=True)
        self.first_layer = layers[0]

    def __call__(self, layer, ids, weights, scores, predictions: dict[int, list[list[int]]]) -> None:
        passes = self.trace.sequences[0].passes
        if layer == self.first_layer:  # a new forward pass begins
            passes.append(Pass("prefill" if ids.shape[0] > 1 else "decode", {}))
        r = LayerRouting(ids.tolist(), weights.float().tolist(),
                         scores.float().tolist() if scores is not None else None, dict(predictions))
        passes[-1].layers[layer] = r
        self.trace.has_predictions |= bool(predictions)
        self.trace.full_scores &= scores is not None

    def write(self, path) -> None:
        write_trace(self.trace, path)
